"""`dsmoe demo`: the main job on the embedded default, end to end on a CPU."""

from __future__ import annotations

import argparse
import time

import torch

from dsmoe.config import preset
from dsmoe.inference.generate import generate
from dsmoe.inference.routing import SparseSetting
from dsmoe.inference.sparsify import ActiveMeter, sparsify
from dsmoe.model.transformer import Transformer


def run_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    cfg = preset("tiny-ds-moe")
    model = Transformer(cfg).eval()
    print(f"tiny-ds-moe: {cfg.non_embedding_params:,} non-embedding parameters (untrained)")
    x = torch.randint(0, cfg.vocab_size, (4, 128))
    for name, mlp in (("dense", None), ("topk k=4", SparseSetting("topk", k=4)),
                      ("threshold eps=1.0", SparseSetting("threshold", threshold=1.0))):
        meter = ActiveMeter(cfg)
        sparsify(model, mlp=mlp, meter=meter)
        start = time.perf_counter()
        with torch.inference_mode():
            loss = model(x[:, :-1], x[:, 1:]).lm_loss
        print(f"  {name:18s} loss {loss:.3f}  active params {meter.active_params / 1e6:.2f}M "
              f"({meter.active_hidden:.0%} hidden)  {time.perf_counter() - start:.2f}s")
    sparsify(model, mlp=SparseSetting("topk", k=4))
    out = generate(model, x[:1, :8], 16)
    print("  generated ids:", out[0, 8:].tolist())
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run the embedded default end to end")
    p.set_defaults(func=run_demo)
