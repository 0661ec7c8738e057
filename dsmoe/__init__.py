"""dsmoe: dense training, sparse inference Mixture-of-Experts language models.

The public names load on first use (PEP 562), so ``import dsmoe`` and the ``dsmoe`` command start without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from dsmoe.version import __version__ as __version__

_PUBLIC = {
    "PRESETS": "dsmoe.config",
    "ConfigError": "dsmoe.config",
    "ModelConfig": "dsmoe.config",
    "preset": "dsmoe.config",
    "generate": "dsmoe.inference.generate",
    "ActiveMeter": "dsmoe.inference.meter",
    "SparsePlan": "dsmoe.model.plan",
    "SparseSetting": "dsmoe.model.settings",
    "ModelOutput": "dsmoe.model.transformer",
    "Transformer": "dsmoe.model.transformer",
}
__all__ = [
    "PRESETS",
    "ActiveMeter",
    "ConfigError",
    "ModelConfig",
    "ModelOutput",
    "SparsePlan",
    "SparseSetting",
    "Transformer",
    "generate",
    "preset",
]

if TYPE_CHECKING:
    from dsmoe.config import PRESETS, ConfigError, ModelConfig, preset
    from dsmoe.inference.generate import generate
    from dsmoe.inference.meter import ActiveMeter
    from dsmoe.model.plan import SparsePlan
    from dsmoe.model.settings import SparseSetting
    from dsmoe.model.transformer import ModelOutput, Transformer


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dsmoe' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
