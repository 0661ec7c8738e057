"""The CPU products a decode or prefill step makes, by the libraries torch reaches, at DS-MoE-1B's shapes (width
2,048; 32 experts of 256; Dense FFN 8,192): what ``dsmoe.kernels.onednn`` chooses between (issue #31 and #33).

* ``mkl``: ``F.linear`` (torch's default fp32 product, MKL's sgemm / sgemv);
* ``onednn``: ``torch.ops.mkldnn._linear_pointwise`` on the plain weight (what ``fast_linear`` calls);
* ``onednn packed``: the same on a weight reordered once by ``torch.ops.mkldnn._reorder_linear_weight`` (inductor's
  frozen-graph layout; an opaque tensor: ``dsmoe.kernels.onednn.pack``, used by ``prepare(prepack=True)``);
* ``reduction``: one row as a broadcast multiply and sum, compiled: what a compiled decode step does with one row
  (``dsmoe.inference.onednn_products.product``, ``dsmoe.kernels.cpu.expert_mlp_gathered``);
* ``int8pack``: ``torch.ops.aten._weight_int8pack_mm``, torch's weight-only int8 kernel (per-channel scales);
* ``int8 mul-sum``: dsmoe's int8 product of a few rows (``quantize.times_rows``), compiled.

Then the products of a decode step in one compiled graph (``--chain``): SmolLM2-135M's 30 layers of one-row
products (q, k, v, o, gate+up, down) and its 49,152-row head, fp32, as ``F.linear`` (MKL), through oneDNN's op, and
as reductions (what ``product`` compiles to): ms per step, GB/s of weights read.

Experts: 32 products of [rows, 2048] x [2048, 256]^T ("expert in") or [rows, 256] x [256, 2048]^T ("expert out",
each expert's [D, F] block contiguous, as ``use_onednn`` stores it; "strided": blocks of one [D, N*F] matrix), every
expert given ``rows`` rows, as in batched decode; then whole matrices, down to the sizes where oneDNN's per-call
cost decides. ms per call (best of --repeats), GB/s = weight bytes at the row's storage width / time.

    .venv/bin/python benchmarks/cpu_products.py --threads 2 --out benchmarks/cpu_products.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dsmoe.bench.throughput import best_of, machine
from dsmoe.inference.quantize import int8_values, times_rows

SHAPES = {  # name: (experts, out, in)
    "expert in": (32, 256, 2048),
    "expert out": (32, 2048, 256),
    "expert out, strided": (32, 2048, 256),
    "dense in": (1, 8192, 2048),
    "dense out": (1, 2048, 8192),
    "attention [2048, 2048]": (1, 2048, 2048),
    "[1024, 2048]": (1, 1024, 2048),
    "[512, 2048]": (1, 512, 2048),
    "[256, 1024]": (1, 256, 1024),
    "[128, 1024]": (1, 128, 1024),
}


def best_ms(fn, repeats: int) -> float:
    """The bench's timing (one warm-up call, then the best of ``repeats``), in ms; ``fn``'s result is dropped
    (``best_of`` would read a returned number as a self-reported time)."""

    def call() -> None:
        fn()

    return best_of({"fn": call}, repeats, "cpu")["fn"] * 1e3


SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (3072, 576), (576, 1536)]


def decode_chain(repeats: int) -> dict:
    """ms per compiled decode step of SmolLM2-135M's products by each path (see the module docstring)."""
    from dsmoe.kernels.onednn import onednn_linear

    layers = [[torch.randn(o, i) / i**0.5 for o, i in SMOLLM2_LAYER] for _ in range(30)]
    head = torch.randn(49152, 576) / 24
    nbytes = (sum(w.numel() for ws in layers for w in ws) + head.numel()) * 4

    def chain(prod):
        def step(x):
            for w in layers:
                x = F.layer_norm(x, x.shape[-1:])  # keeps the random stack finite
                a = prod(prod(x, w[0]) + prod(x, w[1]).repeat(1, 3) + prod(x, w[2]).repeat(1, 3), w[3])
                gate, up = prod(x + a, w[4]).chunk(2, -1)
                x = x + prod(F.silu(gate) * up, w[5])
            return prod(x, head)

        return torch.compile(step, dynamic=False)

    paths = {
        "mkl": chain(F.linear),
        "onednn": chain(onednn_linear),
        "reduction": chain(lambda x, w: (x.unsqueeze(-2) * w).sum(-1)),
    }
    x = torch.randn(1, 576)
    with torch.inference_mode():
        expected = paths["mkl"](x)
        out = {}
        for path, fn in paths.items():
            # 30 random layers amplify rounding differences: the same function, as logits that correlate
            assert torch.corrcoef(torch.stack([fn(x).flatten(), expected.flatten()]))[0, 1] > 0.999, path
            ms = best_ms(lambda fn=fn: fn(x), repeats)
            out[path] = {"ms": ms, "gb_per_s": nbytes / ms / 1e6}
            print(f"SmolLM2 decode chain, compiled: {path:10s} {ms:.2f} ms ({nbytes / ms / 1e6:.1f} GB/s)")
    return out


def products(xs, ws, packed, int8, reduction, mul_sum) -> dict:
    """path -> a call that makes every expert's product with its ``xs`` rows (see the module docstring)."""
    lp, n, rows = torch.ops.mkldnn._linear_pointwise, len(ws), xs.shape[1]
    paths = {
        "mkl": lambda: [F.linear(x, w) for x, w in zip(xs, ws, strict=True)],
        "onednn": lambda: [lp(x, w, None, "none", [], "") for x, w in zip(xs, ws, strict=True)],
        "onednn packed": lambda: [lp(x, w, None, "none", [], "") for x, w in zip(xs, packed, strict=True)],
        "int8pack": lambda: [
            torch.ops.aten._weight_int8pack_mm(xs[e], int8[e][0], int8[e][1].view(-1)) for e in range(n)
        ],
    }
    if rows == 1:
        paths["reduction"] = lambda: [reduction(x, w) for x, w in zip(xs, ws, strict=True)]
    if rows <= 4:
        paths["int8 mul-sum"] = lambda: [mul_sum(xs[e], int8[e][0], int8[e][1]) for e in range(n)]
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 64, 256])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--chain-only", action="store_true", help="only the compiled decode chain")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one graph per shape and row count, never the eager fallback
    mul_sum = torch.compile(times_rows, dynamic=False)
    reduction = torch.compile(lambda x, w: (x.unsqueeze(-2) * w).sum(-1), dynamic=False)
    results = []
    for name, (n, m, k) in {} if args.chain_only else SHAPES.items():
        ws = torch.randn(n, m, k) / k**0.5
        if name == "expert out, strided":  # each expert's [D, F] block of one [D, N*F] matrix: row-strided
            ws = torch.randn(m, n * k).t().unflatten(0, (n, k)).transpose(1, 2) / k**0.5
        packed = [torch.ops.mkldnn._reorder_linear_weight(ws[e].contiguous(), 8) for e in range(n)]
        int8 = [int8_values(ws[e].contiguous()) for e in range(n)]
        for rows in args.rows:
            if (n > 1 and rows > 64) or ("strided" in name and rows > 1):
                continue
            xs = torch.randn(n, rows, k)
            ref = [F.linear(xs[e], ws[e]) for e in range(n)]
            paths = products(xs, ws, packed, int8, reduction, mul_sum)
            for path, fn in paths.items():
                out = fn()
                tol = 1e-3 if "int8" not in path else 0.05
                for a, b in zip(out, ref, strict=True):
                    torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
            row = {"shape": name, "rows": rows}
            for path, fn in paths.items():
                ms = best_ms(fn, args.repeats)
                nbytes = ws.numel() * (1 if "int8" in path else 4)
                row[path] = {"ms": ms, "gb_per_s": nbytes / ms / 1e6}
            results.append(row)
            cells = "  ".join(
                f"{p} {v['ms']:.3f} ({v['gb_per_s']:.1f})" for p, v in row.items() if isinstance(v, dict)
            )
            print(f"{name:18s} rows {rows:4d}  {cells}", flush=True)
    chain = decode_chain(args.repeats)
    if args.out:
        record = {
            "machine": machine("cpu"),
            "threads": args.threads,
            "results": results,
            "decode_chain": chain,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
