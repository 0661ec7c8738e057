"""The command-line flags of a sparse-inference setting, shared by every subcommand that runs a model sparsely."""

from __future__ import annotations

import argparse

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.model.settings import STRATEGIES, SparseSetting
from dsmoe.model.settings_file import load_settings

LayerSettings = SparseSetting | list[SparseSetting | None] | None

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


def add_quantize_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """--quantize none|int8 (weight-only int8 with per-channel scales, dsmoe.inference.quantize)."""
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default="none",
        help=f"store the model's projection weights as int8 (per-channel scales) for {what}",
    )


def sparse_setting(
    strategy: str, k: int | None, threshold: float | None, *, give_k: str, normalize: bool = False
) -> SparseSetting:
    """A SparseSetting whose error for a missing k says how to give it where it is read from (``give_k``: 'pass
    --att-k N', 'add k=N to --model_args')."""
    if strategy == "topk" and (k is None or k < 1):
        raise ConfigError(f"strategy 'topk' needs k >= 1 (got k={k!r}); {give_k}")
    return SparseSetting(strategy, k=k, threshold=threshold, normalize=normalize)


def resolve_sparse_args(args: argparse.Namespace, cfg: ModelConfig) -> tuple[LayerSettings, LayerSettings]:
    """(attention, MLP) settings of a model with config ``cfg``: the --settings file's per-layer lists, or the
    flags' one setting for every layer (None: as trained), checked against the model."""
    path = getattr(args, "settings", None)
    if path is None:
        att, mlp = sparse_settings(args)
        check_settings(cfg, att, mlp)
        return att, mlp
    given = [
        f
        for f in ("strategy", "k", "threshold", "att_strategy", "att_k", "att_threshold")
        if getattr(args, f) is not None
    ]
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ConfigError(f"--settings gives every layer's setting; drop {flags} or drop --settings")
    return load_settings(path, cfg)


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


def check_settings(cfg: ModelConfig, att: LayerSettings, mlp: LayerSettings) -> None:
    """Raise the ConfigError that sparsify() would once the weights are loaded: k above a layer's experts, or a
    list that is not one setting per layer. Layers with one expert have no router and ignore their setting."""
    for kind, settings, n_experts, routed, where in (
        ("att", att, cfg.n_att_experts, cfg.has_att_router, "attention"),
        ("mlp", mlp, cfg.n_mlp_experts, cfg.has_mlp_router, "the MLP"),
    ):
        if settings is None or isinstance(settings, SparseSetting):
            if settings is not None and routed:
                settings.check(n_experts, where)
            continue
        if len(settings) != cfg.n_layers:
            raise ConfigError(
                f"{kind} settings: got {len(settings)} for a model with {cfg.n_layers} layers; "
                "give one setting for all layers or one per layer"
            )
        for i, setting in enumerate(settings):
            if setting is not None and routed:
                setting.check(n_experts, f"{where} layer {i}")
