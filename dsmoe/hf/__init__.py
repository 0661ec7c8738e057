"""Hugging Face integration: ``DSMoEConfig`` / ``DSMoEForCausalLM`` (registered with the Auto classes on import),
``export`` to a self-contained folder that loads with ``trust_remote_code=True``."""

from transformers import AutoConfig, AutoModelForCausalLM

from dsmoe.hf.configuration import DSMoEConfig
from dsmoe.hf.modeling import DSMoEForCausalLM

AutoConfig.register(DSMoEConfig.model_type, DSMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(DSMoEConfig, DSMoEForCausalLM, exist_ok=True)

__all__ = ["DSMoEConfig", "DSMoEForCausalLM"]
