"""dsmoe: dense training, sparse inference Mixture-of-Experts language models."""

from dsmoe.config import PRESETS, ConfigError, ModelConfig, preset
from dsmoe.inference.generate import generate
from dsmoe.inference.sparsify import ActiveMeter, sparsify
from dsmoe.model.routing import SparseSetting
from dsmoe.model.transformer import ModelOutput, Transformer

__all__ = [
    "PRESETS",
    "ActiveMeter",
    "ConfigError",
    "ModelConfig",
    "ModelOutput",
    "SparseSetting",
    "Transformer",
    "generate",
    "preset",
    "sparsify",
]
