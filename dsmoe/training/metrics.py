"""Training metrics to a JSONL file always, and to TensorBoard when it is installed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import torch

from dsmoe.model.losses import entropy
from dsmoe.model.routing import RouterRecord


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # TensorBoard is optional: the JSONL file has everything
            self.writer = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
                elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"{key}/{i}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def counted_probs(record: RouterRecord) -> torch.Tensor:
    """A router's detached probabilities [T, N] over the tokens its losses counted (padding left out)."""
    probs = cast(torch.Tensor, record.probs_TN).detach()
    return probs if record.mask_T is None else probs[record.mask_T]


def router_metrics(routers: list[RouterRecord]) -> dict[str, Any]:
    """Mean router entropy, and per layer the largest share of tokens whose top expert is one expert (the load of
    the busiest expert: 1/N is balanced, 1.0 is collapse)."""
    out: dict[str, Any] = {}
    for kind in ("att", "mlp"):
        probs = [counted_probs(r) for r in routers if r.kind == kind and r.probs_TN is not None]
        if probs:
            out[f"router_entropy_{kind}"] = float(torch.stack([entropy(p).mean() for p in probs]).mean())
            top1 = [
                torch.bincount(p.argmax(-1), minlength=p.shape[-1]).max() / max(p.shape[0], 1) for p in probs
            ]
            out[f"max_load_{kind}"] = [round(float(t), 4) for t in top1]
    return out


# A router has collapsed when one expert is the top choice of more than this share of the tokens: the max_load_*
# that metrics.jsonl logs (1/N is balanced, 1.0 is every token to one expert). The one collapse signal.
COLLAPSE_LOAD = 0.9


def collapsed_routers(metrics: dict[str, Any]) -> list[tuple[str, int, float]]:
    """(kind, layer, load) of every router whose logged ``max_load_{kind}`` is above COLLAPSE_LOAD."""
    return [
        (kind, layer, load)
        for kind in ("att", "mlp")
        for layer, load in enumerate(metrics.get(f"max_load_{kind}", []))
        if load > COLLAPSE_LOAD
    ]
