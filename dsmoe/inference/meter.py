"""The active-parameter meter: a pure function of the router records every forward returns
(``ModelOutput.routers``), summed over the tokens a caller runs. No hooks and no global state: whoever runs the model
adds its records (``meter.update(out.routers)``); the compiled decode step returns each record's expert counts
instead (``meter.update_counts``).

Its figures, named the same in every command's output (eval, sweep, tune, lm-eval, bench, the demo):

* ``active_params``: the non-embedding parameters a token uses, averaged over the tokens: shared K/V projections,
  routers, norms, and the slices of the experts it runs (``ModelConfig.active_params``);
* ``active_share``: ``active_params`` over the model's non-embedding parameters (Dense and DS-MoE as trained: 1);
* ``active_hidden``: the share of expert hidden units a token uses (attention heads and MLP units together), the
  paper's "active hidden"; it differs from ``active_share`` because shared K/V, routers and norms always run.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dsmoe.config import ModelConfig
from dsmoe.model.routing import RouterRecord


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

    def update(self, records: Iterable[RouterRecord]) -> None:
        """Add the router records of one forward (``ModelOutput.routers``), over their real tokens."""
        for record in records:
            self.record(record.kind, record.layer, record.counts_T(), record.mask_T)

    def update_counts(self, counts_RT: torch.Tensor) -> None:
        """Add the experts each token used [records, T], the records in the model's order (attention then MLP of
        layer 0, then of layer 1, ...): what ``router_counts`` gives inside a compiled step."""
        for i, counts_T in enumerate(counts_RT):
            self.record(("att", "mlp")[i % 2], i // 2, counts_T, None)

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
                "ActiveMeter has recorded no tokens yet: add the router records of a forward with meter.update"
            )
        return [a / n for a, n in zip(self.active[kind], self.tokens[kind], strict=True)]

    def _extremes(self, kind: str) -> list[tuple[int, int]]:
        """Fewest and most active experts of a token in each layer."""
        out = []
        for layer, (lo, hi) in enumerate(zip(self.min[kind], self.max[kind], strict=True)):
            if lo is None or hi is None:
                raise RuntimeError(
                    f"ActiveMeter has recorded no tokens in {kind} layer {layer}: add the router records of a "
                    "forward with meter.update"
                )
            out.append((lo, hi))
        return out

    @property
    def active_params(self) -> float:
        return self.cfg.active_params(self.mean_active("att"), self.mean_active("mlp"))

    @property
    def active_hidden(self) -> float:
        return self.cfg.active_hidden(self.mean_active("att"), self.mean_active("mlp"))

    @property
    def active_share(self) -> float:
        return self.active_params / self.cfg.non_embedding_params

    def summary(self) -> dict:
        """The figures of the module docstring, and per-layer mean/min/max share of active experts."""
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
            "active_share": self.active_share,
            "active_hidden": self.active_hidden,
            "non_embedding_params": self.cfg.non_embedding_params,
            "layers": layers,
        }


def router_counts(records: list[RouterRecord], device: torch.device) -> torch.Tensor:
    """The experts each token used in each record of one forward [records, T], in their order, on ``device``."""
    return torch.stack([record.counts_T(device) for record in records])
