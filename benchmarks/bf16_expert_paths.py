"""bf16 expert MLPs on the CPU, native bf16 products against the fp32 upcast (``dsmoe.kernels.cpu.upcast_bf16``), in
one process: the sorted grouped path and the per-expert loop with ``NATIVE_BF16`` set each way, beside the dense
MLP of the same total width in bf16 and fp32. The bench's Llama-layout DS-MoE MLP: D=1024, 32 SwiGLU experts of 88,
top-4. Each time is the best of --repeats rounds in which the variants take turns. Reproduce:

    PYTHONPATH=. .venv/bin/python benchmarks/bf16_expert_paths.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from dsmoe.kernels import cpu
from dsmoe.kernels.reference import activate
from dsmoe.model.routing import route
from dsmoe.model.settings import SparseSetting


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 2048])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, d, f, k = 32, 1024, 88, 4
    gen = torch.Generator().manual_seed(0)
    w_in32, w_out32 = torch.randn(n, 2 * f, d, generator=gen) / 32, torch.randn(n, f, d, generator=gen) / 32
    w_in, w_out = w_in32.bfloat16(), w_out32.bfloat16()
    native = cpu.NATIVE_BF16
    print(f"threads {args.threads}; this CPU multiplies bf16 natively: {native}; ms, best of {args.repeats}")
    print(
        "| tokens | dense fp32 | dense bf16 | sorted, native | sorted, upcast | per-expert, native | per-expert, upcast |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")

    def with_native(flag: bool, fn):
        def job():
            cpu.NATIVE_BF16 = flag
            try:
                return fn()
            finally:
                cpu.NATIVE_BF16 = native

        return job

    def jobs_for(t: int) -> dict:
        x32 = torch.randn(t, d, generator=gen)
        x = x32.bfloat16()
        routing = route(torch.softmax(torch.randn(t, n, generator=gen), -1), SparseSetting("topk", k=k))

        def sorted_path():
            return cpu.expert_mlp_sorted(x, w_in, w_out, routing, "swiglu", cpu.project_sorted)

        def per_expert():
            return cpu.expert_mlp_per_expert(x, w_in, w_out, routing, "swiglu")

        return {
            "dense fp32": lambda: activate(x32 @ w_in32.flatten(0, 1).T, "swiglu") @ w_out32.flatten(0, 1),
            "dense bf16": lambda: activate(x @ w_in.flatten(0, 1).T, "swiglu") @ w_out.flatten(0, 1),
            "sorted native": with_native(True, sorted_path),
            "sorted upcast": with_native(False, sorted_path),
            "per-expert native": with_native(True, per_expert),
            "per-expert upcast": with_native(False, per_expert),
        }

    with torch.inference_mode():
        for t in args.tokens:
            jobs = jobs_for(t)
            best = {name: float("inf") for name in jobs}
            for fn in jobs.values():
                fn()
            for _ in range(args.repeats):
                for name, fn in jobs.items():
                    start = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - start)
            print(f"| {t} | " + " | ".join(f"{best[name] * 1e3:.2f}" for name in jobs) + " |")


if __name__ == "__main__":
    main()
