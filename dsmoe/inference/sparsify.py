"""The one switch from dense to sparse inference, and the meter that counts active parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.model.attention import MoA
from dsmoe.model.experts import MoEMLP
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer

LayerSettings = SparseSetting | Sequence[SparseSetting | None] | None


def moe_layers(model: Transformer, kind: str) -> list[MoA | MoEMLP]:
    """The attention ('att') or MLP ('mlp') layers of a Transformer, in depth order."""
    return [getattr(block, kind) for block in model.blocks]


def sparsify(
    model: Transformer, att: LayerSettings = None, mlp: LayerSettings = None, meter: ActiveMeter | None = None
) -> Transformer:
    """Set the inference routing of every attention and MLP layer, in place, and return the model.

    ``att`` / ``mlp``: one SparseSetting for all layers, a list with one per layer, or None for the layer's trained
    behaviour (all experts for DS-MoE, top-k for SMoE). ``meter``: an ActiveMeter to record active experts, or None.
    Calling ``sparsify(model)`` restores the trained behaviour.
    """
    for kind, settings in (("att", att), ("mlp", mlp)):
        layers = moe_layers(model, kind)
        if settings is None or isinstance(settings, SparseSetting):
            settings = [settings] * len(layers)
        if len(settings) != len(layers):
            raise ConfigError(
                f"{kind} settings: got {len(settings)} for a model with {len(layers)} layers; "
                "give one setting for all layers or one per layer"
            )
        for layer, setting in zip(layers, settings, strict=True):
            if layer.router is None:
                setting = None  # a single expert is always active
            elif setting is not None:
                setting.check(layer.router.weight.shape[0], f"{kind} layer {layer.layer_idx}")
            layer.sparse = setting
            layer.meter = meter
    return model


class ActiveMeter:
    """Counts, per layer, how many experts each processed token uses; turns them into active parameters."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        n = self.cfg.n_layers
        self.tokens = {k: [0] * n for k in ("att", "mlp")}
        self.active = {k: [0] * n for k in ("att", "mlp")}
        self.min: dict[str, list[int | None]] = {k: [None] * n for k in ("att", "mlp")}
        self.max: dict[str, list[int | None]] = {k: [None] * n for k in ("att", "mlp")}

    def record(self, kind: str, layer: int, counts_T: torch.Tensor, mask_T: torch.Tensor | None) -> None:
        if mask_T is not None:
            counts_T = counts_T[mask_T.to(counts_T.device)]
        if counts_T.numel() == 0:
            return
        lo, hi = int(counts_T.min()), int(counts_T.max())
        self.tokens[kind][layer] += counts_T.numel()
        self.active[kind][layer] += int(counts_T.sum())
        old_lo, old_hi = self.min[kind][layer], self.max[kind][layer]
        self.min[kind][layer] = lo if old_lo is None else min(old_lo, lo)
        self.max[kind][layer] = hi if old_hi is None else max(old_hi, hi)

    def record_dense(self, kind: str, layer: int, n_experts: int, mask_T: torch.Tensor | None, n_tokens: int):
        self.record(kind, layer, torch.full((n_tokens,), n_experts), mask_T)

    def mean_active(self, kind: str) -> list[float]:
        """Mean active experts per token in each layer."""
        if any(n == 0 for n in self.tokens[kind]):
            raise RuntimeError(
                "ActiveMeter has recorded no tokens yet: run the model after sparsify(..., meter=...)"
            )
        return [a / n for a, n in zip(self.active[kind], self.tokens[kind], strict=True)]

    def _extremes(self, kind: str) -> list[tuple[int, int]]:
        """Fewest and most active experts of a token in each layer."""
        out = []
        for layer, (lo, hi) in enumerate(zip(self.min[kind], self.max[kind], strict=True)):
            if lo is None or hi is None:
                raise RuntimeError(
                    f"ActiveMeter has recorded no tokens in {kind} layer {layer}: run the model after "
                    "sparsify(..., meter=...)"
                )
            out.append((lo, hi))
        return out

    @property
    def active_params(self) -> float:
        return self.cfg.active_params(self.mean_active("att"), self.mean_active("mlp"))

    @property
    def active_hidden(self) -> float:
        return self.cfg.active_hidden(self.mean_active("att"), self.mean_active("mlp"))

    def summary(self) -> dict:
        """Active parameters, active hidden share, and per-layer mean/min/max share of active experts."""
        n_exp = {"att": self.cfg.n_att_experts, "mlp": self.cfg.n_mlp_experts}
        layers = {
            kind: [
                {"mean": m / n_exp[kind], "min": lo / n_exp[kind], "max": hi / n_exp[kind]}
                for m, (lo, hi) in zip(self.mean_active(kind), self._extremes(kind), strict=True)
            ]
            for kind in ("att", "mlp")
        }
        return {
            "active_params": self.active_params,
            "active_hidden": self.active_hidden,
            "non_embedding_params": self.cfg.non_embedding_params,
            "layers": layers,
        }
