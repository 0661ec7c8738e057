"""`dsmoe generate`: continue a prompt with a checkpoint, printing tokens as they are chosen, under any sparse
setting, eager or through the compiled decode step, with full-precision or int8 weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsmoe.config import ConfigError


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.data.tokenizer import eos_id
    from dsmoe.inference.arguments import COMPILING, plan_from_args
    from dsmoe.inference.generate import stream
    from dsmoe.inference.prepare import prepare
    from dsmoe.training.checkpoint import checkpoint_config

    cfg = checkpoint_config(args.checkpoint)
    if not (args.checkpoint / "tokenizer.json").is_file():
        raise ConfigError(f"checkpoint {args.checkpoint} has no tokenizer.json; generating text needs it")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError(
            f"need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature}, {args.top_p}"
        )
    plan = plan_from_args(args, cfg)
    prepared = prepare(
        args.checkpoint, plan, quantize=args.quantize, kernels=args.kernels, compile=args.compile
    )
    tokenizer = prepared.tokenizer
    prompt = tokenizer.encode(args.prompt).ids
    if not prompt:
        raise ConfigError("--prompt is empty after tokenization; give some text")
    if len(prompt) + args.max_new_tokens > cfg.max_seq_len:
        raise ConfigError(
            f"{len(prompt)} prompt tokens + --max-new-tokens {args.max_new_tokens} exceed the model's max_seq_len "
            f"{cfg.max_seq_len}; shorten one"
        )
    generator = torch.Generator().manual_seed(args.seed)
    if prepared.compile:
        print(COMPILING, file=sys.stderr, flush=True)
    print(args.prompt, end="", flush=True)
    ids: list[int] = []
    shown = ""
    for token in stream(
        prepared.model,
        torch.tensor(prompt),
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        eos_token_id=eos_id(tokenizer),
        generator=generator,
        plan=prepared.plan,
        compile=prepared.compile,
    ):
        ids.append(token)
        text = tokenizer.decode(ids)  # decoded whole, so that tokens merging into one character print right
        print(text[len(shown) :], end="", flush=True)
        shown = text
    print(file=sys.stdout)
    return 0


def add_commands(sub) -> None:
    from dsmoe.inference.arguments import COMPILE_HELP, add_kernels_arg, add_quantize_arg, add_sparse_args

    p = sub.add_parser(
        "generate",
        help="continue a prompt with a checkpoint (streamed; any sparse setting; eager, compiled or int8)",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint folder (with tokenizer.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds sampling")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    add_sparse_args(p)
    add_quantize_arg(p, "generation; implies --compile")
    add_kernels_arg(p)
    p.set_defaults(func=cmd_generate)
