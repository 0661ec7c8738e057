"""`dsmoe plan --preset NAME | --config RUN.yaml [key=value ...] --gpus N --gpu-memory-gb G`: memory per GPU of a
training step (traced, see dsmoe.training.plan) and the largest micro-batch that fits."""

from __future__ import annotations

import argparse
import json
import sys

from dsmoe.config import PRESETS, ConfigError
from dsmoe.training.config import load_train_config

# A preset alone gets the paper's sequence length and the 1B models' batch (0.5M tokens; 3B/6B used 2M:
# global_batch_tokens=2097152).
PRESET_SEQ_LEN = 2048
PRESET_GLOBAL_BATCH = 524288
ROWS = (
    ("parameters", "parameters (this rank's shards)"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer state (AdamW)"),
    ("gathered", "all-gathered blocks (FSDP2)"),
    ("activations", "activations and temporaries"),
)


def add_commands(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="memory per GPU of a training step (traced on fake tensors) and the largest micro-batch that fits",
        description="Trace training steps of a preset or run config on fake tensors, sharded by FSDP2 over --gpus "
        "ranks, with and without activation checkpointing; print the memory per rank and the largest "
        "micro-batch within --gpu-memory-gb less --headroom. The CUDA context, allocator fragmentation and NCCL "
        "buffers are not traced: the headroom is for them.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    source.add_argument(
        "--config", help="a YAML run config (configs/*.yaml): its model, seq_len, batch, dtype"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help=f"key=value overrides (seq_len=4096, global_batch_tokens=2097152); a preset alone runs at "
        f"seq_len={PRESET_SEQ_LEN} (or its max_seq_len), global_batch_tokens={PRESET_GLOBAL_BATCH}",
    )
    p.add_argument("--gpus", type=int, required=True, help="ranks the model is sharded over")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of each GPU in GB (10^9 bytes)")
    p.add_argument(
        "--headroom", type=float, default=0.1, help="fraction of each GPU kept free for what is not traced"
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_plan)


def plan_config(args: argparse.Namespace):
    if args.config is not None:
        return load_train_config(args.config, args.overrides)
    if args.preset not in PRESETS:
        from dsmoe.config import preset

        preset(args.preset)  # raises the unknown-preset error with its hint
    max_len = PRESETS[args.preset].get("max_seq_len", 2048)
    given = {o.partition("=")[0] for o in args.overrides}
    defaults = {
        "model.preset": args.preset,
        "data": "(none: dsmoe plan reads no data)",
        "seq_len": min(PRESET_SEQ_LEN, max_len),
        "global_batch_tokens": PRESET_GLOBAL_BATCH,
        "total_tokens": 10**12,
    }
    base = [f"{k}={v}" for k, v in defaults.items() if k not in given]
    return load_train_config(None, base + list(args.overrides))


def cmd_plan(args: argparse.Namespace) -> int:
    from dsmoe.training.plan import make_plan

    if args.gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
    say = lambda line: print(f"dsmoe plan: {line}", file=sys.stderr, flush=True)  # noqa: E731
    result = make_plan(plan_config(args), args.gpus, args.gpu_memory_gb, args.headroom, report=say)
    result["name"] = args.preset or args.config
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def format_plan(plan: dict) -> str:
    """The plan as a table: the breakdown at each setting's largest micro-batch (at micro-batch 1 if none fits)."""
    off, on = plan["settings"]
    lines = [
        f"{plan['name']}: {plan['total_params']:,} parameters, {plan['dtype']}, seq_len {plan['seq_len']}, "
        f"global batch {plan['global_batch_tokens']:,} tokens",
        f"{plan['world_size']} GPUs x {plan['gpu_memory_gb']:g} GB, sharding: {plan['sharding']}; budget "
        f"{_gb(plan['budget_bytes'])} GB per GPU ({plan['headroom']:.0%} headroom, see below)",
        "",
        f"{'per rank, GB (10^9 bytes)':44s}{'AC off':>10s}{'AC on':>10s}",
    ]

    def shown(setting: dict) -> dict:
        size = setting["largest_micro_batch"] or 1
        return next(m for m in setting["traced"] if m["micro_batch"] == size)

    at = [shown(off), shown(on)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"  {label:42s}" + "".join(f"{v:>10s}" for v in values))

    row("at micro-batch", [str(m["micro_batch"]) for m in at])
    for key, label in ROWS:
        row(label, [_gb(m["parts"][key]) for m in at])
    row("peak", [_gb(m["peak"]) for m in at])
    row("peak at micro-batch 1", [_gb(s["traced"][0]["peak"]) for s in (off, on)])
    row("peak growth per sequence", [_gb(s["per_sequence"]) for s in (off, on)])
    row("largest micro-batch that fits", [str(s["largest_micro_batch"]) for s in (off, on)])
    accumulating = [m["accumulation"] for m in at]
    lines += [
        "",
        "Traced on fake tensors (FakeTensorMode + torch's FSDPMemTracker): two forward/backward passes, the "
        "optimizer step and",
        "gradient clipping of the training loop. Gradient accumulation (more than one micro-batch per step) "
        "keeps every rank's",
        "unsharded fp32 gradients until the step's last micro-batch"
        + (" (included above)." if any(accumulating) else " (not needed here)."),
        "Not counted (left to the headroom): CUDA context, cuBLAS/attention workspaces, allocator "
        "fragmentation, NCCL buffers, torch.compile.",
    ]
    return "\n".join(lines)
