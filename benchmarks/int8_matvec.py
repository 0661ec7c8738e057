"""Weight-only int8 on this CPU, before building it into dsmoe (issue #17, item 6): one decode-sized product of
activations [M, 1024] with a [5632, 1024] weight (the bench's Dense SwiGLU input projection), fp32 against the ways
PyTorch offers to read int8 weights with per-output-channel scales:

* ``int8pack_mm``: ``torch.ops.aten._weight_int8pack_mm``, PyTorch's own CPU int8 weight-only kernel (what gpt-fast
  and torchao's int8 weight-only layout call on CPUs);
* ``compiled dequant + linear``: ``F.linear(x, q.to(x.dtype)) * s`` under torch.compile;
* ``compiled mul-sum``: the product written as a broadcast multiply and a sum under torch.compile, which inductor
  turns into one reduction kernel that reads the int8 weights (gpt-fast's trick on GPUs).

Each figure is the best of --repeats rounds of --inner calls, the variants taking turns; the error column is the
largest absolute difference from the fp32 product. Reproduce:

    .venv/bin/python benchmarks/int8_matvec.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5632, 1024, generator=gen) / 32
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    dequant_linear = torch.compile(lambda x, q, s: F.linear(x, q.to(x.dtype)) * s)
    mul_sum = torch.compile(lambda x, q, s: (x[:, None, :] * q.to(x.dtype)[None]).sum(-1) * s)
    print(f"threads {args.threads}; ms per product (best of {args.repeats} rounds of {args.inner})")
    print("| M | fp32 | int8pack_mm | compiled dequant + linear | compiled mul-sum | largest error |")
    print("|---:|---:|---:|---:|---:|---:|")
    for m in (1, 16):
        x = torch.randn(m, 1024, generator=gen)
        jobs = {
            "fp32": lambda x=x: F.linear(x, w),
            "int8pack": lambda x=x: torch.ops.aten._weight_int8pack_mm(x, q, scale),
            "dequant": lambda x=x: dequant_linear(x, q, scale),
            "mul-sum": lambda x=x: mul_sum(x, q, scale),
        }
        exact = jobs["fp32"]()
        error = max(float((fn() - exact).abs().max()) for fn in jobs.values())
        best = {name: float("inf") for name in jobs}
        for _ in range(args.repeats):
            for name, fn in jobs.items():
                start = time.perf_counter()
                for _ in range(args.inner):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / args.inner)
        cells = " | ".join(f"{best[n] * 1e3:.3f}" for n in jobs)
        print(f"| {m} | {cells} | {error:.2e} |")


if __name__ == "__main__":
    main()
