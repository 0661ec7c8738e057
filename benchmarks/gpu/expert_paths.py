"""The sparse expert MLP on a CUDA GPU: every path, and the Triton kernel's launch shapes, against the dense MLP of
the same total width, in one process. Also counts each path's host syncs and kernel launches at decode sizes.

    python benchmarks/gpu/expert_paths.py [--out expert_paths.json] [--budget-s 150]

Shape: `dsmoe bench --shape llama --d-model 1024`'s DS-MoE layer (32 SwiGLU experts of 88, top-4, D 1024), bf16.
Paths: dense (the Llama MLP over all 2,816 units: gate, up, down), reference (a loop over experts), sorted
(sorted dispatch with torch's grouped_mm), triton (scatter-to-scatter, default blocks), fused (the expert MLP in 4-6
Triton launches, dsmoe/kernels/triton_fused.py; its launch count at decode sizes should read 4) and triton at each
launch shape of a small grid.
Times are CUDA-event medians of 20 calls after 3 warm-ups; the grid stops at --budget-s and says how far it got.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsmoe.kernels import _EXPERT_MLP
from dsmoe.kernels.cpu import SortedPairs
from dsmoe.kernels.triton_kernels import Blocks, choose_blocks, scatter2scatter
from dsmoe.model.routing import route
from dsmoe.model.settings import SparseSetting


def median_ms(fn, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def launches_and_syncs(fn) -> dict[str, int]:
    """Kernel launches and host syncs (stream/device synchronize, device-to-host copies) of one call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    launch = sum(("LaunchKernel" in n) or n == "cuLaunchKernel" for n in names)
    sync = sum(("Synchronize" in n) or ("Memcpy" in n and "DtoH" in n) for n in names)
    copies = sum(n in ("cudaMemcpyAsync", "cudaMemcpy") for n in names)
    return {"kernel_launches": launch, "synchronizes": sync, "memcpy_calls": copies}


def launch_grid(up, down, deadline: float) -> tuple[dict[str, list[float]], str | None]:
    """Both projections' times at each launch shape of the grid, until the deadline (then: where it stopped)."""
    grid = {}
    for m, (bn, bk), warps in itertools.product(
        (16, 32, 64, 128), ((64, 64), (128, 64), (64, 32), (128, 128)), (4, 8)
    ):
        blocks = Blocks(m, bn, bk, warps, 3)
        if time.monotonic() > deadline:
            return grid, ",".join(map(str, blocks))
        grid[",".join(map(str, blocks))] = [
            round(median_ms(lambda b=blocks: up(b)), 4),
            round(median_ms(lambda b=blocks: down(b)), 4),
        ]
    return grid, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("expert_paths.json"))
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="stop the launch-shape grid after this long"
    )
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--width", type=int, default=88)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    started = time.monotonic()
    torch.manual_seed(0)
    dev, dtype, n, f, d = "cuda", torch.bfloat16, args.experts, args.width, args.d_model
    w_in = torch.randn(n, 2 * f, d, device=dev, dtype=dtype) / d**0.5
    w_out = torch.randn(n, f, d, device=dev, dtype=dtype) / f**0.5
    # the dense (Llama) MLP of the same total width: gate and up projections, then down
    gate, up, down = w_in[:, :f].reshape(-1, d), w_in[:, f:].reshape(-1, d), w_out.reshape(-1, d)
    result: dict = {
        "shape": {k: v for k, v in vars(args).items() if k != "out"} | {"dtype": "bf16"},
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "sizes": {},
    }

    def dense(x):
        return (F.silu(F.linear(x, gate)) * F.linear(x, up)) @ down

    for tokens in (1, 16, 256, 4096, 16384):
        x = torch.randn(tokens, d, device=dev, dtype=dtype)
        routing = route(
            torch.softmax(torch.randn(tokens, n, device=dev), -1), SparseSetting("topk", k=args.k)
        )
        paths = {"dense": lambda x=x: dense(x)}
        for name in ("reference", "sorted", "triton", "fused"):
            paths[name] = lambda x=x, r=routing, fn=_EXPERT_MLP[name]: fn(x, w_in, w_out, r, "swiglu")
        row: dict = {"pairs_per_expert": tokens * args.k / n, "ms": {}, "counts": {}}
        row["default_blocks_up_down"] = [
            list(choose_blocks(tokens * args.k / n, d, 2 * f)),
            list(choose_blocks(tokens * args.k / n, f, d)),
        ]
        pairs = SortedPairs(routing)
        for name, fn in paths.items():
            with torch.no_grad():
                row["ms"][name] = round(median_ms(fn), 4)
                if tokens <= 16:
                    row["counts"][name] = launches_and_syncs(fn)
        if tokens >= 256:  # the launch-shape grid: each projection alone
            h = torch.randn(pairs.token_P.shape[0], f, device=dev, dtype=dtype)
            up_b = lambda b, x=x, pairs=pairs: scatter2scatter(x, w_in.transpose(1, 2), pairs, True, b)
            down_b = lambda b, h=h, pairs=pairs: scatter2scatter(h, w_out, pairs, False, b)
            grid, stopped = launch_grid(up_b, down_b, started + args.budget_s)
            row["grid_up_down_ms"] = grid
            if stopped:
                result["grid_stopped"] = f"at {tokens} tokens, before blocks {stopped}: out of time"
            if grid:
                best = min(grid, key=lambda k: sum(grid[k]))
                row["grid_best"] = {"blocks": best, "ms": grid[best]}
        result["sizes"][tokens] = row
        print(tokens, json.dumps({k: v for k, v in row.items() if k != "grid_up_down_ms"}), flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["seconds"] = round(time.monotonic() - started)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
