"""DS-MoE language models: dense training, sparse inference -- prepare data, train, evaluate, serve and export.

The `dsmoe` command. Each subsystem adds its subcommands through an ``add_commands(subparsers)`` function; a
subcommand parses its arguments, builds a config and calls one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from dsmoe.config import PRESETS, ConfigError, preset
from dsmoe.inference.arguments import add_sparse_args, plan_from_args
from dsmoe.model.settings import DENSE, SparseSetting


def cmd_info(args: argparse.Namespace) -> int:
    cfg = preset(args.preset)
    plan = plan_from_args(args, cfg)  # one setting for every layer: layer 0's stands for all
    # a layer of one expert has no router and always runs it
    att = plan.setting("att", 0) if cfg.has_att_router else DENSE
    mlp = plan.setting("mlp", 0) if cfg.has_mlp_router else DENSE
    att_active = _nominal_active(att, cfg.n_att_experts)
    mlp_active = _nominal_active(mlp, cfg.n_mlp_experts)
    info = {
        "preset": args.preset,
        "config": cfg.to_dict(),
        "total_params": cfg.total_params,
        "non_embedding_params": cfg.non_embedding_params,
        "embedding_params": cfg.embedding_params,
        "att_strategy": att.describe(),
        "mlp_strategy": mlp.describe(),
    }
    if att_active is not None and mlp_active is not None:
        info["active_params"] = round(cfg.active_params(att_active, mlp_active))
        info["active_hidden"] = cfg.active_hidden(att_active, mlp_active)
    else:
        info["active_params_note"] = "threshold strategies are data-dependent: measure with `dsmoe eval`"
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.preset}: regime {cfg.regime}")
    for key, value in cfg.to_dict().items():
        print(f"  {key:20s} {value}")
    print(f"  total params         {cfg.total_params:,}")
    print(f"  non-embedding params {cfg.non_embedding_params:,}")
    if "active_params" in info:
        print(
            f"  active params        {info['active_params']:,} ({info['active_hidden']:.1%} of expert hidden units)"
            f"  [att {att.describe()}, mlp {mlp.describe()}]"
        )
    else:
        print(f"  active params        {info['active_params_note']}")
    return 0


def _nominal_active(setting: SparseSetting, n_experts: int) -> float | None:
    """Active experts per token implied by a setting alone (None when it depends on the data)."""
    if n_experts == 1 or setting.strategy == "dense":
        return float(n_experts)
    if setting.strategy == "topk":
        if setting.k is None:  # SparseSetting.__post_init__ rules this out
            raise ConfigError("strategy 'topk' needs k")
        return float(setting.k)
    return None


def build_parser() -> argparse.ArgumentParser:
    from dsmoe.version import __version__

    parser = argparse.ArgumentParser(prog="dsmoe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dsmoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print a preset's config and parameter counts")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_sparse_args(p, settings_file=False)
    p.set_defaults(func=cmd_info)
    for module in _command_modules():
        module.add_commands(sub)
    return parser


def _command_modules() -> list:
    import importlib

    names = [
        "dsmoe.data.commands",
        "dsmoe.training.commands",
        "dsmoe.training.plan_commands",
        "dsmoe.evaluation.commands",
        "dsmoe.evaluation.generate_command",
        "dsmoe.hf.export",
        "dsmoe.hf.serve",
        "dsmoe.bench.commands",
        "dsmoe.convert.commands",
        "dsmoe.demo",
    ]
    return [importlib.import_module(n) for n in names]


def _warnings_as_lines() -> None:
    """dsmoe's own warnings: each message once, as one line (not Python's file:line and the source line)."""
    warnings.filterwarnings("once", module=r"dsmoe(\.|$)")
    default = warnings.formatwarning
    if getattr(default, "dsmoe", False):
        return
    package = os.path.dirname(os.path.abspath(__file__))

    def one_line(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package):
            return f"dsmoe: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    one_line.dsmoe = True  # type: ignore[attr-defined]
    warnings.formatwarning = one_line


def main(argv: list[str] | None = None) -> int:
    _warnings_as_lines()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "pass_through", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = extra  # a command that hands its arguments to another tool (dsmoe lm-eval)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:  # an expected failure: one line that names the problem and the fix
        if os.environ.get("DSMOE_TRACEBACK"):
            raise
        print(f"dsmoe: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsmoe: interrupted", file=sys.stderr)
        return 130
