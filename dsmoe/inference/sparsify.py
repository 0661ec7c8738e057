"""The one switch from dense to sparse inference (a transform applied to the model once, not state its layers read
on the side), and the meter that counts active parameters from the layers' router records, outside the layers."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch.utils.hooks import RemovableHandle

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.model.attention import MoA
from dsmoe.model.experts import MoEMLP
from dsmoe.model.routing import RouterRecord
from dsmoe.model.settings import SparseSetting, trained_setting
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
    behaviour (all experts for DS-MoE, top-k for SMoE). ``meter``: an ActiveMeter to record active experts from
    then on (it replaces any meter attached before), or None to detach it. ``sparsify(model)`` restores the trained
    behaviour.
    """
    trained = trained_setting(model.cfg.regime, model.cfg.smoe_top_k)
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
            if setting is not None and layer.router is not None:
                setting.check(layer.router.weight.shape[0], f"{kind} layer {layer.layer_idx}")
            # a layer without router has one expert, always active
            layer.setting = trained if setting is None or layer.router is None else setting
    attach_meter(model, meter)
    return model


def layer_settings(model: Transformer, kind: str) -> list[SparseSetting | None]:
    """Each layer's inference setting, None where the layer runs as trained (what ``sparsify`` takes back)."""
    trained = trained_setting(model.cfg.regime, model.cfg.smoe_top_k)
    return [None if layer.setting == trained else layer.setting for layer in moe_layers(model, kind)]


_METERS: weakref.WeakKeyDictionary[Transformer, tuple[ActiveMeter, list[RemovableHandle]]] = (
    weakref.WeakKeyDictionary()
)


def attach_meter(model: Transformer, meter: ActiveMeter | None) -> None:
    """Count what every MoE layer of ``model`` runs into ``meter`` (forward hooks that read the layers' router
    records), replacing the meter attached before; None only detaches it."""
    _, handles = _METERS.pop(model, (None, []))
    for handle in handles:
        handle.remove()
    if meter is None:
        return
    handles = [
        layer.register_forward_hook(meter.hook)
        for kind in ("att", "mlp")
        for layer in moe_layers(model, kind)
    ]
    _METERS[model] = (meter, handles)


def attached_meter(model: Transformer) -> ActiveMeter | None:
    return _METERS.get(model, (None, []))[0]


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

    def hook(self, layer: MoA | MoEMLP, args: tuple, output: tuple[torch.Tensor, RouterRecord]) -> None:
        """A forward hook on one MoE layer: count its router record (the layer knows its depth; the record gets it
        only from ``Transformer.hidden``, after the hook has run)."""
        record = output[1]
        self.record(record.kind, layer.layer_idx, record.counts_T(), record.mask_T)

    def update(self, record: RouterRecord) -> None:
        """Add one layer's router record, over its real tokens."""
        self.record(record.kind, record.layer, record.counts_T(), record.mask_T)

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
