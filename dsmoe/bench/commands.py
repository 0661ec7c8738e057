"""`dsmoe bench`: Dense vs SMoE vs DS-MoE latency and token throughput, measured in one process; with --peers,
transformers' Llama and OLMoE at the same shape beside them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsmoe.bench.settings import DECODE_MODES, DEFAULT_SIZE, SHAPES, SIZES, TOY_WIDTH, BenchSettings
from dsmoe.files import write_atomic
from dsmoe.inference.arguments import QUANTIZATIONS, add_kernels_arg


def add_commands(sub) -> None:
    p = sub.add_parser(
        "bench", help="latency and token throughput: Dense vs SMoE vs DS-MoE (paper Table 6, scaled)"
    )
    d = BenchSettings()
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=d.dtype)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")
    p.add_argument(
        "--size",
        choices=SIZES,
        default="",
        help="the paper's models, per layer exactly: 1b/3b/6b (Table 1's Dense, SMoE, DS-MoE), 10b/14b/19b "
        f"(Table 6), --n-layers deep (default {DEFAULT_SIZE}); toy: the Table 6 shape scaled to --d-model "
        "(earlier runs; the default when --d-model is given)",
    )
    p.add_argument("--d-model", type=int, default=None, help=f"--size toy: its width (default {TOY_WIDTH})")
    p.add_argument("--n-layers", type=int, default=d.n_layers)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--input-len", type=int, default=d.input_len)
    p.add_argument(
        "--memory-gb", type=float, default=d.memory_gb, help="budget for the input-throughput batch"
    )
    p.add_argument("--max-input-batch", type=int, default=d.max_input_batch)
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens)
    p.add_argument("--decode-batches", type=int, nargs="+", default=list(d.decode_batches))
    p.add_argument("--latency-batch", type=int, default=d.latency_batch)
    p.add_argument("--latency-prompt", type=int, default=d.latency_prompt)
    p.add_argument("--latency-new", type=int, default=d.latency_new)
    p.add_argument(
        "--mlp-tokens", type=int, default=d.mlp_tokens, help="tokens of the MLP FLOP/s measurement"
    )
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--mlp-k", type=int, default=d.mlp_k, help="DS-MoE: active MLP experts of 32")
    p.add_argument(
        "--att-k", type=int, default=None, help="DS-MoE: active attention experts of 8 (default dense)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    p.add_argument(
        "--shape",
        choices=SHAPES,
        default=d.shape,
        help="layout. table6: the paper's (GELU, LayerNorm); llama: transformers' Llama/OLMoE (SwiGLU, RMSNorm). "
        "A named --size keeps its widths and heads in both; the toy's llama layout has 16 heads of D/16 and an "
        "FFN of 8D/3 rounded up to 256",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="also measure transformers' LlamaForCausalLM (peer of Dense) and OlmoeForCausalLM (peer of DS-MoE) "
        "at the same shape, in the same rounds, and report our ratio to each (needs --shape llama)",
    )
    p.add_argument(
        "--decode",
        choices=DECODE_MODES,
        default=d.decode,
        help="our models' decode steps (output throughput, latency): eager, compiled (one torch.compile'd graph "
        "per step over a static KV cache), or both, each model then also as a '+compiled' row",
    )
    p.add_argument(
        "--bandwidth-mb",
        type=int,
        default=d.bandwidth_mb,
        help="buffer size for measuring memory bandwidth (batch-1 decode is reported as a share of it)",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=d.quantize,
        help="also measure our models with int8 weights (rows NAME+int8, same weights; "
        "dsmoe.inference.quantize): int8 pays in compiled batch-1 decode",
    )
    p.add_argument(
        "--mkl",
        action="store_true",
        help="also measure our models on torch's own fp32 products (rows NAME+mkl, same weights) beside oneDNN's "
        "(dsmoe.inference.onednn_products)",
    )
    p.add_argument(
        "--prepack",
        action="store_true",
        help="also measure our models with oneDNN's weights packed for batched products (rows NAME+prepack, same "
        "weights, twice the weight memory; prepare(prepack=True))",
    )
    add_kernels_arg(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    s = BenchSettings(
        device=args.device,
        dtype=args.dtype,
        size=args.size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        vocab_size=args.vocab_size,
        input_len=args.input_len,
        memory_gb=args.memory_gb,
        max_input_batch=args.max_input_batch,
        decode_tokens=args.decode_tokens,
        decode_batches=tuple(args.decode_batches),
        latency_batch=args.latency_batch,
        latency_prompt=args.latency_prompt,
        latency_new=args.latency_new,
        mlp_tokens=args.mlp_tokens,
        repeats=args.repeats,
        mlp_k=args.mlp_k,
        att_k=args.att_k,
        threads=args.threads,
        shape=args.shape,
        peers=args.peers,
        decode=args.decode,
        bandwidth_mb=args.bandwidth_mb,
        quantize=args.quantize,
        mkl=args.mkl,
        prepack=args.prepack,
        kernels=args.kernels,
    )
    from dsmoe.bench.throughput import run_benchmark

    result = run_benchmark(s)
    text = json.dumps(result, indent=2)
    if args.out:
        write_atomic(args.out, text + "\n")
    print(text if args.json else format_table(result))
    return 0


def _ratio_table(title: str, rows: dict[str, dict], metrics) -> list[str]:
    """Markdown rows of ratios, one row per entry, with the active and total parameter ratios last."""
    lines = [
        f"| {title} | " + " | ".join(metrics) + " | active params | total params |",
        "|---" * (len(metrics) + 3) + "|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r[m]:.2f}x" for m in metrics)
            + f" | {r['active_params']:.2f}x | {r['total_params']:.2f}x |"
        )
    return lines


def format_table(result: dict) -> str:
    """Markdown tables: absolute figures, ratios to Dense, ratios to the peers (with --peers), MLP FLOP/s."""
    metrics = [
        m for m in next(iter(result["models"].values())) if m.startswith(("input", "output", "latency"))
    ]
    lines = [
        "| model | " + " | ".join(metrics) + " | active params | total params |",
        "|---" * (len(metrics) + 3) + "|",
    ]
    for name, r in result["models"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r[m]:.4g}" for m in metrics)
            + f" | {r['active_params'] / 1e6:.1f}M | {r['total_params'] / 1e6:.1f}M |"
        )
    lines += ["", *_ratio_table("ratio to dense", result["ratios"], metrics)]
    if "peer_ratios" in result:
        peers = {f"{name} / {r['peer']}": r for name, r in result["peer_ratios"].items()}
        lines += ["", *_ratio_table("ratio to peer", peers, metrics)]
        lines.append("")
        for name, peer in result["peers"].items():
            check = peer["param_check"]
            apart = [f"+{n:,} {what} in {name}" for what, n in check["only_in_peer"].items()]
            apart += [f"+{n:,} {what} in {peer['of']}" for what, n in check["only_in_dsmoe"].items()]
            lines.append(
                f"{name} ({peer['class']}, attention {peer['attn_implementation']}"
                + (f", experts {peer['experts_implementation']}" if peer["experts_implementation"] else "")
                + f"): {check['peer']:,} non-embedding parameters, {peer['of']} {check['dsmoe']:,}; "
                + ("identical" if not apart else f"{check['shared']:,} shared, " + ", ".join(apart))
            )
    lines += _bandwidth_lines(result)
    lines += [
        "",
        "| MLP path (layer 0) | GFLOP | seconds | GFLOP/s | share of dense GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["mlp_flops"].items():
        lines.append(
            f"| {name} | {r['gflop']:.3g} | {r['seconds']:.4g} | {r['gflops_per_s']:.3g} | "
            f"{r['share_of_dense_flops_per_s']:.0%} |"
        )
    lines.append(
        f"\ninput batch {result['input_batch']} x {result['settings']['input_len']} tokens; "
        f"latency_s ratio < 1 means faster than dense"
    )
    return "\n".join(lines)


def _bandwidth_lines(result: dict) -> list[str]:
    """The measured memory bandwidth and, for batch-1 decode, each model's weight reads as a share of it."""
    memory = result.get("memory_bandwidth")
    if not memory:
        return []
    lines = [
        "",
        f"memory bandwidth, this run: read {memory['read_gb_per_s']:.1f} GB/s (a streaming sum: the limit), "
        + (
            f"torch's matrix-vector product {memory['matvec_gb_per_s']:.1f} GB/s, "
            if "matvec_gb_per_s" in memory
            else ""
        )
        + f"copy {memory['copy_gb_per_s']:.1f} GB/s",
    ]
    rows = {n: r for n, r in result["models"].items() if "decode_b1_bandwidth_share" in r}
    if rows:
        lines += [
            "",
            "| batch-1 decode | weights read per token | weights read, GB/s | share of read bandwidth |",
            "|---|---|---|---|",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {r['decode_b1_weight_bytes_per_token'] / 1e6:.1f} MB | "
                f"{r['decode_b1_weight_gb_per_s']:.2f} | {r['decode_b1_bandwidth_share']:.0%} |"
            )
    return lines


__all__ = ["add_commands", "cmd_bench"]
