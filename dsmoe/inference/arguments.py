"""The command-line flags of a sparse-inference setting, shared by every subcommand that runs a model sparsely."""

from __future__ import annotations

import argparse

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.model.plan import FLAGS, SparsePlan
from dsmoe.model.settings import KERNEL_IMPLS, STRATEGIES
from dsmoe.model.settings_file import load_plan

QUANTIZATIONS = ("none", "int8")  # weight storage for inference (dsmoe.inference.quantize)

AS_TRAINED = "as trained (Dense, DS-MoE: every expert; SMoE: its trained top-k); 'dense' runs every expert"


def add_sparse_args(parser: argparse.ArgumentParser, settings_file: bool = True) -> None:
    """--strategy/--k/--threshold for MLP routers, --att-* for attention routers, and (``settings_file``)
    --settings FILE for per-layer settings written by `dsmoe tune`. Without a strategy a layer runs as it was
    trained."""
    g = parser.add_argument_group("sparse inference")
    if settings_file:
        g.add_argument(
            "--settings",
            metavar="FILE",
            help="per-layer attention and MLP settings (a JSON file written by `dsmoe tune`); replaces the flags below",
        )
    g.add_argument("--strategy", choices=STRATEGIES, help=f"MLP expert selection; default: {AS_TRAINED}")
    g.add_argument("--k", type=int, help="experts per token for topk")
    g.add_argument("--threshold", type=float, help="eps for threshold strategies (compares S_i * N)")
    g.add_argument(
        "--att-strategy", choices=STRATEGIES, help="attention expert selection; default: as trained"
    )
    g.add_argument("--att-k", type=int)
    g.add_argument("--att-threshold", type=float)
    g.add_argument(
        "--normalize-weights",
        action="store_true",
        help="rescale the selected experts' scores to sum to one (default: the scores as they are, as in the paper)",
    )


# What --compile does (the help of every command that has it), and the note those commands print before it compiles.
COMPILE_HELP = (
    "decode through a torch.compile'd step over a static KV cache: compiling takes tens of seconds (once per batch "
    "size and cache length, in steps of 64 tokens), after which each token is faster, so it pays for long "
    "generations and a server's repeated requests, not for one short generation"
)
COMPILING = "compiling the decode step (first call of this batch size and length only; tens of seconds)..."


def add_kernels_arg(parser: argparse.ArgumentParser) -> None:
    """--kernels: which implementation computes the sparse experts (dsmoe.model.settings.Kernels)."""
    parser.add_argument(
        "--kernels",
        choices=KERNEL_IMPLS,
        default="auto",
        help="sparse expert kernels: auto (by device: CPU 'cpu', CUDA 'sorted'), or one named, e.g. 'reference'",
    )


def add_quantize_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """--quantize none|int8 (weight-only int8 with per-channel scales, dsmoe.inference.quantize)."""
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default="none",
        help=f"store the model's projection weights as int8 (per-channel scales) for {what}",
    )


def plan_from_args(args: argparse.Namespace, cfg: ModelConfig) -> SparsePlan:
    """The plan of ``add_sparse_args``' flags for a model with config ``cfg``: the --settings file's, or the flags'
    one setting per router kind for every layer (as trained where no strategy is given)."""
    flags = {
        "att_strategy": args.att_strategy,
        "att_k": args.att_k,
        "att_threshold": args.att_threshold,
        "mlp_strategy": args.strategy,
        "mlp_k": args.k,
        "mlp_threshold": args.threshold,
        "normalize_weights": True if getattr(args, "normalize_weights", False) else None,
    }
    path = getattr(args, "settings", None)
    if path is None:
        return SparsePlan.parse(flags, cfg, FLAGS)
    given = [FLAGS.name(field) for field, value in flags.items() if value is not None]
    if given:
        raise ConfigError(
            f"--settings gives every layer's setting; drop {', '.join(given)} or drop --settings"
        )
    return load_plan(path, cfg)
