"""The command-line flags of a sparse-inference setting, shared by every subcommand that runs a model sparsely."""

from __future__ import annotations

import argparse

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.model.settings import STRATEGIES, SparseSetting

AS_TRAINED = "as trained (Dense, DS-MoE: every expert; SMoE: its trained top-k); 'dense' runs every expert"


def add_sparse_args(parser: argparse.ArgumentParser) -> None:
    """--strategy/--k/--threshold for MLP routers, --att-* for attention routers. Without a strategy a layer runs
    as it was trained."""
    g = parser.add_argument_group("sparse inference")
    g.add_argument("--strategy", choices=STRATEGIES, help=f"MLP expert selection; default: {AS_TRAINED}")
    g.add_argument("--k", type=int, help="experts per token for topk")
    g.add_argument("--threshold", type=float, help="eps for threshold strategies (compares S_i * N)")
    g.add_argument(
        "--att-strategy", choices=STRATEGIES, help="attention expert selection; default: as trained"
    )
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


def sparse_settings(args: argparse.Namespace) -> tuple[SparseSetting | None, SparseSetting | None]:
    """(attention, MLP) settings from add_sparse_args' flags; None where no strategy was given (as trained)."""
    return (
        _flag_setting(args.att_strategy, args.att_k, args.att_threshold, "--att-"),
        _flag_setting(args.strategy, args.k, args.threshold, "--"),
    )


def _flag_setting(
    strategy: str | None, k: int | None, threshold: float | None, flag: str
) -> SparseSetting | None:
    if strategy is None:
        if k is not None or threshold is not None:
            given = f"{flag}k" if k is not None else f"{flag}threshold"
            raise ConfigError(f"{given} needs {flag}strategy (topk, threshold or threshold_topk) to apply to")
        return None
    return sparse_setting(strategy, k, threshold, give_k=f"pass {flag}k N")


def check_settings(cfg: ModelConfig, att: SparseSetting | None, mlp: SparseSetting | None) -> None:
    """Raise the ConfigError that sparsify() would once the weights are loaded: k above a layer's experts. Layers
    with one expert have no router and ignore their setting."""
    if att is not None and cfg.has_att_router:
        att.check(cfg.n_att_experts, "attention")
    if mlp is not None and cfg.has_mlp_router:
        mlp.check(cfg.n_mlp_experts, "the MLP")
