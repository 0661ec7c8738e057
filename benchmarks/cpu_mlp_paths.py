"""The CPU expert-MLP paths of dsmoe.kernels.cpu against each other, the plain reference and the dense MLP of the
same total width, at the benchmark's DS-MoE shape (D=1024, 32 experts of 128, top-4, GeLU), in one process; plus
the number of top-level ATen operations in one batch-1 decode step of `dsmoe bench`'s Dense and DS-MoE models.
Each time is the best of --repeats rounds in which the paths take turns. Reproduce:

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_mlp_paths.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dsmoe.bench.models import bench_models
from dsmoe.kernels.cpu import expert_mlp_one_token, expert_mlp_per_expert, expert_mlp_sorted, project_sorted
from dsmoe.kernels.reference import activate, expert_mlp_reference
from dsmoe.model.routing import route
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer


def best_time(jobs: dict, repeats: int, inner: int) -> dict[str, float]:
    best = {name: float("inf") for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            start = time.perf_counter()
            for _ in range(inner):
                job()
            best[name] = min(best[name], (time.perf_counter() - start) / inner)
    return best


def one_token_gather(x_1D, w_in_NFD, w_out_NFD, routing, activation):
    """The batch-1 path before 2026-12-04, kept here as the baseline: the selected experts' input rows gathered
    (copied) into one matrix-vector product, the output one weighted sum of W_out rows (embedding_bag)."""
    experts, weights = routing.indices.view(-1), routing.weights.view(-1)
    f_in, d, f = w_in_NFD.shape[1], w_in_NFD.shape[2], w_out_NFD.shape[1]
    h = w_in_NFD.index_select(0, experts).view(-1, d) @ x_1D.view(-1)
    h = activate(h.view(-1, f_in), activation) * weights[:, None]
    rows = (experts[:, None] * f + torch.arange(f)).view(-1)
    bag = F.embedding_bag(
        rows, w_out_NFD.view(-1, d), rows.new_zeros(1), mode="sum", per_sample_weights=h.view(-1)
    )
    return bag.view(1, -1)


def mlp_jobs(x, routing, w_in, w_out) -> dict:
    """The dense MLP of the same total width, and every expert-MLP path, on the same tokens and routing."""
    jobs = {
        "dense": lambda: activate(x @ w_in.flatten(0, 1).T, "gelu") @ w_out.flatten(0, 1),
        "reference": lambda: expert_mlp_reference(x, w_in, w_out, routing, "gelu"),
        "sorted": lambda: expert_mlp_sorted(x, w_in, w_out, routing, "gelu", project_sorted),
        "per-expert": lambda: expert_mlp_per_expert(x, w_in, w_out, routing, "gelu"),
    }
    if x.shape[0] == 1:
        jobs["one-token"] = lambda: expert_mlp_one_token(x, w_in, w_out, routing, "gelu")
        jobs["one-token-gather"] = lambda: one_token_gather(x, w_in, w_out, routing, "gelu")
    return jobs


def decode_step_ops() -> dict[str, int]:
    """Top-level ATen operations in one batch-1 decode step (4 layers), Dense vs DS-MoE as `dsmoe bench` builds them."""
    from torch.profiler import profile

    counts = {}
    for entry in bench_models(1024, 4, 4096, 1024):
        if entry.name == "smoe":
            continue
        model = Transformer(entry.cfg).eval()
        cache = model.new_cache(1, 64)
        with torch.inference_mode():
            model(torch.randint(0, 4096, (1, 32)), plan=entry.plan, cache=cache)
            with profile() as prof:
                model(torch.tensor([[5]]), plan=entry.plan, cache=cache, start_pos=32, last_only=True)
        counts[entry.name] = sum(
            1
            for e in prof.events()
            if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        )
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 1024, 2048, 4096])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, d, f, k = 32, 1024, 128, 4
    gen = torch.Generator().manual_seed(0)
    w_in, w_out = torch.randn(n, f, d, generator=gen) / 32, torch.randn(n, f, d, generator=gen) / 32
    print(
        f"threads {args.threads}; times in ms (best of {args.repeats}); GFLOP/s counts the multiply-adds needed"
    )
    print(
        "| tokens | dense MLP | reference | sorted + grouped_mm | per-expert loop | one-token in place | "
        "one-token gather (before) | best sparse share of dense GFLOP/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for t in args.tokens:
            x = torch.randn(t, d, generator=gen)
            routing = route(torch.softmax(torch.randn(t, n, generator=gen), -1), SparseSetting("topk", k=k))
            jobs = mlp_jobs(x, routing, w_in, w_out)
            ref = jobs["reference"]()
            for name in ("sorted", "per-expert", "one-token", "one-token-gather"):
                if name in jobs:
                    torch.testing.assert_close(jobs[name](), ref, rtol=1e-4, atol=1e-5)
            times = best_time(jobs, args.repeats, inner=max(1, 256 // t))
            sparse = min(
                v for name, v in times.items() if name not in ("dense", "reference", "one-token-gather")
            )
            share = (4 * t * k * d * f / sparse) / (4 * t * n * d * f / times["dense"])
            cells = [
                f"{times[name] * 1e3:.3f}" if name in times else "-"
                for name in ("dense", "reference", "sorted", "per-expert", "one-token", "one-token-gather")
            ]
            print(f"| {t} | " + " | ".join(cells) + f" | {share:.0%} |")
    ops = decode_step_ops()
    print(
        f"\ntop-level ATen operations per batch-1 decode step (4 layers): dense {ops['dense']}, "
        f"ds-moe {ops['ds-moe']}"
    )


if __name__ == "__main__":
    main()
