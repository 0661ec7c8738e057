"""Hugging Face integration: ``DSMoEConfig`` / ``DSMoEForCausalLM`` wrapping the project's ``Transformer``, and
``dsmoe export`` to a self-contained folder that loads with ``trust_remote_code=True``.

Importing a name from here (``from dsmoe.hf import DSMoEForCausalLM``) registers the classes with ``AutoConfig`` and
``AutoModelForCausalLM``. transformers is imported only then, so the ``dsmoe`` CLI stays fast without it.
"""

__all__ = ["DSMoEConfig", "DSMoEForCausalLM", "register_auto_classes"]


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` resolve model_type 'dsmoe' to this package's classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsmoe.hf.configuration import DSMoEConfig
    from dsmoe.hf.modeling import DSMoEForCausalLM

    AutoConfig.register(DSMoEConfig.model_type, DSMoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(DSMoEConfig, DSMoEForCausalLM, exist_ok=True)


def __getattr__(name: str):
    if name == "DSMoEConfig":
        register_auto_classes()
        from dsmoe.hf.configuration import DSMoEConfig

        return DSMoEConfig
    if name == "DSMoEForCausalLM":
        register_auto_classes()
        from dsmoe.hf.modeling import DSMoEForCausalLM

        return DSMoEForCausalLM
    raise AttributeError(f"module 'dsmoe.hf' has no attribute '{name}'")
