"""The command-line flags of a sparse-inference setting, shared by every subcommand that runs a model sparsely."""

from __future__ import annotations

import argparse

from dsmoe.model.routing import STRATEGIES, SparseSetting


def add_sparse_args(parser: argparse.ArgumentParser) -> None:
    """--strategy/--k/--threshold for MLP routers, --att-* for attention routers (default: attention dense)."""
    g = parser.add_argument_group("sparse inference")
    g.add_argument("--strategy", choices=STRATEGIES, default="dense", help="MLP expert selection")
    g.add_argument("--k", type=int, help="experts per token for topk")
    g.add_argument("--threshold", type=float, help="eps for threshold strategies (compares S_i * N)")
    g.add_argument("--att-strategy", choices=STRATEGIES, default="dense", help="attention expert selection")
    g.add_argument("--att-k", type=int)
    g.add_argument("--att-threshold", type=float)


def sparse_settings(args: argparse.Namespace) -> tuple[SparseSetting, SparseSetting]:
    """(attention, MLP) settings from add_sparse_args' flags."""
    att = SparseSetting(args.att_strategy, k=args.att_k, threshold=args.att_threshold)
    mlp = SparseSetting(args.strategy, k=args.k, threshold=args.threshold)
    return att, mlp
