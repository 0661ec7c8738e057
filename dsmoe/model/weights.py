"""Does a config fit its weights? The tensors ``Transformer(cfg)`` holds, compared with the names and shapes a weights
file declares, before a model is built or a weight is read.

A config edited apart from its weights (``n_layers`` raised in config.json) would otherwise load: the extra layers
keep uninitialised memory and every logit is NaN. The sizes are compared first, by arithmetic
(``ModelConfig.total_params``), so an absurd config (a million layers) is refused before a model of its size is built.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.model.transformer import Transformer

Shapes = dict[str, tuple[int, ...]]
SHOWN = 5  # keys named per kind of difference; the count says how many more


def expected_shapes(cfg: ModelConfig) -> Shapes:
    """Name -> shape of every saved tensor of ``Transformer(cfg)`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def safetensors_shapes(files: Iterable[str | Path]) -> Shapes:
    """Name -> shape of every tensor in ``files``, read from their headers only."""
    shapes: Shapes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as err:  # safetensors raises its own error types for a malformed header
            raise ConfigError(f"cannot read the weights file {path}: {err}") from err
    return shapes


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_weights(cfg: ModelConfig, held: Shapes, where: str, prefix: str = "") -> None:
    """A ConfigError naming every tensor that ``cfg`` calls for and ``held`` (name -> shape, names under ``prefix``)
    lacks, holds beside, or holds with another shape. ``where`` names the config and the weights in the message."""
    fix = (
        "the config was edited, or belongs to other weights: restore the config written with these weights "
        "(dsmoe train / dsmoe export write both)"
    )
    total = sum(math.prod(shape) for shape in held.values())
    if total != cfg.total_params:
        raise ConfigError(
            f"{where}: the config describes a model of {cfg.total_params:,} parameters ({cfg.n_layers} layers of "
            f"width {cfg.d_model}, vocabulary {cfg.vocab_size}), but the weights hold {total:,}; {fix}"
        )
    want = {prefix + name: shape for name, shape in expected_shapes(cfg).items()}
    missing = sorted(set(want) - set(held))
    unexpected = sorted(set(held) - set(want))
    differ = sorted(
        f"{name} (config {list(want[name])}, weights {list(held[name])})"
        for name in set(want) & set(held)
        if want[name] != held[name]
    )
    parts = [
        f"{label}: {_listed(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", differ))
        if keys
    ]
    if parts:
        raise ConfigError(f"{where}: the weights do not fit the config ({'; '.join(parts)}); {fix}")
