"""vLLM's CPU fused MoE (``cpu_fused_moe``, the kernel the vLLM model uses for top-k SwiGLU experts) against the dense
SwiGLU MLP of the same total width, at the DS-MoE-1B layer in the SwiGLU layout (width 2,048; 32 experts of 256,
top-4; the dense MLP 8,192 wide), fp32, in one process, the paths taking turns, best of --repeats. FLOP/s count the
products computed: 3 x 2 x D x F per (token, expert) pair, 3 x 2 x D x 8,192 per token for the dense MLP. Each layer's
weights are distinct (--layers of them, beyond the caches), as in a model. Run in vLLM's venv:

    .venv-vllm/bin/python benchmarks/vllm/fused_moe_flops.py --threads 2 --out benchmarks/vllm/fused_moe_flops.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

from dsmoe.bench.throughput import machine
from dsmoe.kernels.onednn import pack, packed_linear

D, N, F_EXPERT, K = 2048, 32, 256, 4
F_DENSE = N * F_EXPERT


def best_time(jobs: dict, repeats: int) -> dict[str, float]:
    best = {name: float("inf") for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure(t: int, w13: list, w2: list, up: list, down: list, repeats: int) -> dict:
    """One token count: each path over every layer's weights, ms per layer and FLOP/s."""
    x = torch.randn(t, D)
    weights, ids = torch.softmax(torch.randn(t, N), -1).topk(K, -1)
    ids = ids.to(torch.int32)
    out = torch.empty_like(x)
    layers = range(len(w13))

    def sparse() -> None:
        for i in layers:
            cpu_fused_moe(out, x, w13[i], w2[i], None, None, weights, ids, "silu", "vec")

    def dense() -> None:
        for i in layers:
            gate, value = packed_linear(x, up[i]).chunk(2, dim=-1)
            packed_linear(F.silu(gate) * value, down[i])

    with torch.inference_mode():
        seconds = best_time({"fused-moe": sparse, "dense": dense}, repeats)
    flops = {"fused-moe": 3 * 2 * D * F_EXPERT * K * t, "dense": 3 * 2 * D * F_DENSE * t}
    gflops = {name: flops[name] * len(w13) / seconds[name] / 1e9 for name in seconds}
    return {
        "tokens": t,
        "ms_per_layer": {n: round(s / len(w13) * 1e3, 3) for n, s in seconds.items()},
        "gflop_per_s": {n: round(g, 1) for n, g in gflops.items()},
        "share_of_dense": round(gflops["fused-moe"] / gflops["dense"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 2048])
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = range(args.layers)
    w13 = [cpu_prepack_moe_weight(torch.randn(N, 2 * F_EXPERT, D) / 45, "vec") for _ in layers]
    w2 = [cpu_prepack_moe_weight(torch.randn(N, D, F_EXPERT) / 16, "vec") for _ in layers]
    # the dense MLP as dsmoe's prepacked Dense runs it: oneDNN products on packed weights
    up = [pack(torch.randn(2 * F_DENSE, D) / 45) for _ in layers]
    down = [pack(torch.randn(D, F_DENSE) / 90) for _ in layers]
    rows = []
    for t in args.tokens:
        row = measure(t, w13, w2, up, down, args.repeats)
        rows.append(row)
        print(
            f"| {t} | {row['ms_per_layer']['fused-moe']} | {row['ms_per_layer']['dense']} | "
            f"{row['gflop_per_s']['fused-moe']} | {row['gflop_per_s']['dense']} | {row['share_of_dense']:.0%} |",
            flush=True,
        )
    result = {"machine": machine("cpu"), "threads": args.threads, "layers": args.layers, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
