"""`dsmoe train --config configs/NAME.yaml [key=value ...] [--resume | --resume-from STEP_DIR]`."""

from __future__ import annotations

import argparse
import json
import os

from dsmoe.training.config import RESUME_CHANGEABLE, load_train_config


def cmd_train(args: argparse.Namespace) -> int:
    from dsmoe.training.distributed import cleanup
    from dsmoe.training.loop import train
    from dsmoe.training.resume import resume_config

    resume = args.resume or args.resume_from is not None
    if resume:
        cfg = resume_config(args.config, args.overrides, args.resume_from)
    else:
        cfg = load_train_config(args.config, args.overrides)
    finished = False
    try:
        result = train(cfg, resume=resume, max_steps=args.max_steps, resume_from=args.resume_from)
        finished = True
    finally:
        cleanup(wait_for_all=finished)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (torchrun --nproc_per_node=N -m dsmoe train ... for many)",
        description="Train Dense, SMoE or DS-MoE models. Overrides are dotted key=value pairs: "
        "lr=1e-3, total_tokens=5e6, model.alpha_mlp=1e-3. A resumed run takes its configuration from its "
        "checkpoint; overrides may then change only " + ", ".join(RESUME_CHANGEABLE) + ".",
    )
    p.add_argument("--config", help="YAML run config (configs/*.yaml); on resume, only its out_dir is read")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in out_dir (from --config or out_dir=...) from its newest checkpoint that verifies; "
        "a new run if it has none",
    )
    p.add_argument(
        "--resume-from",
        metavar="STEP_DIR",
        help="continue from this checkpoint (RUN/checkpoints/step-NNNNNNNN); newer ones are moved to "
        "RUN/checkpoints/superseded/",
    )
    p.add_argument(
        "--max-steps", type=int, help="stop after this many steps in this call (with a checkpoint)"
    )
    p.set_defaults(func=cmd_train)
