"""The command-line flags of a sparse-inference setting, shared by every subcommand that runs a model sparsely."""

from __future__ import annotations

import argparse

from dsmoe.config import ConfigError, ModelConfig
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


def sparse_setting(
    strategy: str, k: int | None, threshold: float | None, *, give_k: str, normalize: bool = False
) -> SparseSetting:
    """A SparseSetting whose error for a missing k says how to give it where it is read from (``give_k``: 'pass
    --att-k N', 'add k=N to --model_args')."""
    if strategy == "topk" and (k is None or k < 1):
        raise ConfigError(f"strategy 'topk' needs k >= 1 (got k={k!r}); {give_k}")
    return SparseSetting(strategy, k=k, threshold=threshold, normalize=normalize)


def sparse_settings(args: argparse.Namespace) -> tuple[SparseSetting, SparseSetting]:
    """(attention, MLP) settings from add_sparse_args' flags."""
    att = sparse_setting(args.att_strategy, args.att_k, args.att_threshold, give_k="pass --att-k N")
    mlp = sparse_setting(args.strategy, args.k, args.threshold, give_k="pass --k N")
    return att, mlp


def check_settings(cfg: ModelConfig, att: SparseSetting | None, mlp: SparseSetting | None) -> None:
    """Raise the ConfigError that sparsify() would once the weights are loaded: k above a layer's experts. Layers
    with one expert have no router and ignore their setting."""
    if att is not None and cfg.has_att_router:
        att.check(cfg.n_att_experts, "attention")
    if mlp is not None and cfg.has_mlp_router:
        mlp.check(cfg.n_mlp_experts, "the MLP")
