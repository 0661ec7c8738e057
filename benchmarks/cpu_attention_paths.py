"""The CPU paths of sparse attention (dsmoe.kernels.cpu) against each other, at the DS-MoE-1B attention shape (width
2,048, 16 attention experts of 2 heads of 64, 8 K/V heads, top-8), fp32, eager, one layer's MoA of a prepared model,
in one process:

* per-expert: each selected expert's query and output rows by its own tokens (``moa_per_expert``; with
  ``--prepack``, each expert's packed rows: ``moa_packed``);
* all-heads: every head of every token through the whole W_q and W_o, unselected experts at weight zero
  (``moa_all_heads``; with ``--prepack``, through the packed whole matrices);
* sorted: the grouped products over the expert-sorted pairs (``moa_sorted``).

Decode (one new token per row after 64 cached) at batches 1, 16 and 64, and prefill of 4 rows of 16 to 256 tokens.
Each time is the best of --repeats rounds in which the paths take turns; the paths' outputs are checked equal first.
Reproduce:

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_attention_paths.py --threads 2 [--prepack] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from cpu_mlp_paths import best_time  # this folder, on the path when run as a script

from dsmoe.bench.models import bench_models
from dsmoe.bench.throughput import machine
from dsmoe.inference.prepare import prepare
from dsmoe.kernels import cpu
from dsmoe.kernels.reference import AttentionContext
from dsmoe.model.routing import route
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer

CASES = [(1, 1, 64), (16, 1, 64), (64, 1, 64), (4, 16, 0), (4, 32, 0), (4, 64, 0), (4, 128, 0), (4, 256, 0)]


def paths(att, x: torch.Tensor, routing, ctx: AttentionContext, prepack: bool) -> dict:
    """The three paths' calls on one input."""
    width = att.wq.shape[1]
    if prepack:
        per_expert = lambda: cpu.moa_packed(
            x, att.packed_q_experts, att.packed_o_experts, width, routing, ctx
        )  # noqa: E731
    else:
        per_expert = lambda: cpu.moa_per_expert(x, att.wq, att.wo, routing, ctx)  # noqa: E731
    return {
        "per-expert": per_expert,
        "all-heads": lambda: cpu.moa_all_heads(x, routing, ctx, att.query, att.output),
        "sorted": lambda: cpu.moa_sorted(x, att.wq, att.wo, routing, ctx),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prepack", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    entry = {m.name: m for m in bench_models(2048, 1, 4096, 2048, 4, 8, "table6", "1b")}["ds-moe+att"]
    model = prepare(Transformer(entry.cfg), entry.plan, dtype=torch.float32, prepack=args.prepack).model
    att = model.blocks[0].att
    n = att.n_experts
    rows = []
    for b, t, cached in CASES:
        s = cached + t
        x = torch.randn(b * t, 2048)
        k, v = torch.randn(b, att.n_kv, s, att.head_dim), torch.randn(b, att.n_kv, s, att.head_dim)
        cos, sin = torch.randn(s, att.head_dim), torch.randn(s, att.head_dim)
        pos = (torch.arange(t) + cached).repeat(b)
        ctx = AttentionContext(k, v, torch.arange(b).repeat_interleave(t), pos, cos, sin, batch_major=True)
        routing = route(torch.softmax(torch.randn(b * t, n), -1), SparseSetting("topk", k=8))
        jobs = paths(att, x, routing, ctx, args.prepack)
        with torch.inference_mode():
            outputs = {name: job() for name, job in jobs.items()}
            for name, out in outputs.items():
                torch.testing.assert_close(out, outputs["sorted"], rtol=1e-3, atol=1e-3, msg=name)
            times = best_time(jobs, args.repeats, inner=3)
        row = {"batch": b, "new_tokens": t, "pairs_per_expert": b * t * 8 / n}
        row.update({f"{name}_ms": round(sec * 1e3, 3) for name, sec in times.items()})
        rows.append(row)
        print(
            f"| {b} x {t} | {row['pairs_per_expert']:.0f} | "
            + " | ".join(f"{row[f'{name}_ms']:.2f}" for name in jobs)
            + f" | {times['all-heads'] / times['per-expert']:.2f}x |",
            flush=True,
        )
    result = {"machine": machine("cpu"), "threads": args.threads, "prepack": args.prepack, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
