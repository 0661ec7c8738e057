"""`dsmoe train --config configs/NAME.yaml [key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import json
import os

from dsmoe.training.config import load_train_config


def cmd_train(args: argparse.Namespace) -> int:
    from dsmoe.training.distributed import cleanup
    from dsmoe.training.loop import train

    cfg = load_train_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume, max_steps=args.max_steps)
    finally:
        cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (torchrun --nproc_per_node=N -m dsmoe train ... for many)",
        description="Train Dense, SMoE or DS-MoE models. Overrides are dotted key=value pairs: "
        "lr=1e-3, total_tokens=5e6, model.alpha_mlp=1e-3.",
    )
    p.add_argument("--config", help="YAML run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir")
    p.add_argument(
        "--max-steps", type=int, help="stop after this many steps in this call (with a checkpoint)"
    )
    p.set_defaults(func=cmd_train)
