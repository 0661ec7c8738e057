"""The sparse-settings file: one setting per layer for the attention and the MLP routers, as JSON, checked against a
model's config when read. ``dsmoe tune`` writes it; ``dsmoe eval``, ``dsmoe sweep``, ``dsmoe export``, ``dsmoe
serve``, the lm-eval model and the Hugging Face wrapper read it (``--settings FILE``, ``settings=FILE``). Torch-free,
so the command line and the vLLM model can read it without loading anything heavy.

Format (version 1)::

    {"format": "dsmoe-sparse-settings", "version": 1, "n_layers": 2,
     "att": [{"strategy": "threshold", "threshold": 0.5}, null],
     "mlp": [{"strategy": "threshold", "threshold": 1.25}, {"strategy": "topk", "k": 3}],
     "normalize": false,
     "meta": {...}}

``att`` / ``mlp``: a list with one entry per layer, in depth order, or one entry for every layer. An entry is
``{"strategy": ..., "k": ..., "threshold": ...}`` (``k`` for ``topk`` only, ``threshold`` for the threshold
strategies only) or ``null``: the layer runs as trained (every expert for DS-MoE, its top-k for SMoE). ``normalize``
rescales the selected scores to sum to one (optional, default false). ``meta`` is free-form (how the file was made)
and is not read.

In a Hugging Face ``config.json`` the same settings are the lists ``att_strategy``, ``att_k``, ``att_threshold``,
``mlp_strategy``, ``mlp_k``, ``mlp_threshold`` (one value per layer, ``null`` where unused) and
``normalize_weights``: see ``config_fields``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.model.settings import STRATEGIES, SparseSetting

SETTINGS_FORMAT = "dsmoe-sparse-settings"
SETTINGS_VERSION = 1
ENTRY_KEYS = ("strategy", "k", "threshold")
TOP_KEYS = ("format", "version", "n_layers", "att", "mlp", "normalize", "meta")

LayerList = list[SparseSetting | None]


def load_settings(path: str | Path, cfg: ModelConfig) -> tuple[LayerList, LayerList]:
    """(attention settings, MLP settings), one per layer of ``cfg`` (None: as trained), from a settings file.

    Raises ConfigError naming the file and the problem: unreadable JSON, a wrong number of layers, an unknown
    strategy, a k or threshold out of range for the model."""
    return settings_from_dict(read_settings_file(path), cfg, where=str(path))


def read_settings_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"settings file {path} does not exist; write one with `dsmoe tune ... --out {path}`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"settings file {path} is not valid JSON ({err}); write it with `dsmoe tune`"
        ) from err
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path} must hold a JSON object with 'att' and 'mlp' lists")
    return data


def settings_from_dict(
    data: dict[str, Any], cfg: ModelConfig, where: str = "settings"
) -> tuple[LayerList, LayerList]:
    """The checked per-layer settings of a parsed settings file (see the module docstring)."""
    if data.get("format", SETTINGS_FORMAT) != SETTINGS_FORMAT:
        raise ConfigError(f"{where}: format is {data.get('format')!r}, expected {SETTINGS_FORMAT!r}")
    if data.get("version", SETTINGS_VERSION) != SETTINGS_VERSION:
        raise ConfigError(
            f"{where}: version {data.get('version')!r} is not understood (this dsmoe reads version "
            f"{SETTINGS_VERSION}); upgrade dsmoe or rewrite the file with `dsmoe tune`"
        )
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; a settings file has {', '.join(TOP_KEYS)}"
        )
    if "n_layers" in data and data["n_layers"] != cfg.n_layers:
        raise ConfigError(
            f"{where} was made for a model of {data['n_layers']} layers; this model has {cfg.n_layers}"
        )
    normalize = data.get("normalize", False)
    if not isinstance(normalize, bool):
        raise ConfigError(f"{where}: normalize must be true or false, got {normalize!r}")
    if "att" not in data and "mlp" not in data:
        raise ConfigError(f"{where} has neither 'att' nor 'mlp' settings")
    n_experts = {"att": cfg.n_att_experts, "mlp": cfg.n_mlp_experts}
    out = []
    for kind in ("att", "mlp"):
        entries = data.get(kind)
        if entries is None or isinstance(entries, dict):
            entries = [entries] * cfg.n_layers
        if not isinstance(entries, list):
            raise ConfigError(f"{where}: '{kind}' must be a list with one entry per layer, or one entry")
        if len(entries) != cfg.n_layers:
            raise ConfigError(
                f"{where}: '{kind}' has {len(entries)} entries for a model with {cfg.n_layers} layers; give one "
                "per layer (or one object for every layer)"
            )
        out.append(
            [
                parse_entry(e, normalize, n_experts[kind], f"{where}: {kind} layer {i}")
                for i, e in enumerate(entries)
            ]
        )
    return out[0], out[1]


def parse_entry(entry: Any, normalize: bool, n_experts: int, where: str) -> SparseSetting | None:
    """One layer's entry -> a SparseSetting (None for ``null``), range-checked against the layer's experts."""
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ConfigError(
            f'{where}: expected an object like {{"strategy": "threshold", "threshold": 1.0}} or null'
        )
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; an entry has {', '.join(ENTRY_KEYS)}"
        )
    strategy, k, threshold = entry.get("strategy"), entry.get("k"), entry.get("threshold")
    if strategy not in STRATEGIES:
        raise ConfigError(f"{where}: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "topk":
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_experts:
            raise ConfigError(
                f"{where}: topk needs an integer k in 1..{n_experts} (the layer's experts), got {k!r}"
            )
    elif k is not None:
        raise ConfigError(f"{where}: k is read by strategy 'topk' only, not {strategy!r}; remove it")
    if strategy in ("threshold", "threshold_topk"):
        number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
        if not (number and math.isfinite(threshold) and 0 < threshold <= n_experts):  # type: ignore[arg-type, operator]
            raise ConfigError(
                f"{where}: {strategy} needs a threshold in (0, {n_experts}] (it compares S_i * N_experts; above "
                f"N only the top expert is ever kept), got {threshold!r}"
            )
        threshold = float(threshold)  # type: ignore[arg-type]
    elif threshold is not None:
        raise ConfigError(
            f"{where}: threshold is read by the threshold strategies only, not {strategy!r}; remove it"
        )
    return SparseSetting(strategy, k=k, threshold=threshold, normalize=normalize)


def setting_entry(setting: SparseSetting | None) -> dict[str, Any] | None:
    """A setting as a file entry (None: as trained)."""
    if setting is None:
        return None
    out: dict[str, Any] = {"strategy": setting.strategy}
    if setting.strategy == "topk":
        out["k"] = setting.k
    if setting.strategy in ("threshold", "threshold_topk"):
        out["threshold"] = setting.threshold
    return out


def settings_to_dict(
    att: Sequence[SparseSetting | None],
    mlp: Sequence[SparseSetting | None],
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The file's JSON object for per-layer settings (both lists one per layer)."""
    if len(att) != len(mlp):
        raise ValueError(f"att has {len(att)} settings and mlp {len(mlp)}; give one per layer for both")
    normalize = {s.normalize for s in (*att, *mlp) if s is not None}
    if len(normalize) > 1:
        raise ValueError("a settings file has one normalize flag: the settings disagree on it")
    data: dict[str, Any] = {
        "format": SETTINGS_FORMAT,
        "version": SETTINGS_VERSION,
        "n_layers": len(att),
        "att": [setting_entry(s) for s in att],
        "mlp": [setting_entry(s) for s in mlp],
        "normalize": normalize == {True},
    }
    if meta:
        data["meta"] = meta
    return data


def config_fields(
    att: SparseSetting | Sequence[SparseSetting | None] | None,
    mlp: SparseSetting | Sequence[SparseSetting | None] | None,
) -> dict[str, Any]:
    """The Hugging Face config.json encoding of (att, mlp) settings: ``{kind}_strategy`` / ``_k`` / ``_threshold``
    as one value (one setting) or a list with one value per layer, plus ``normalize_weights`` when set. None (as
    trained) gives no keys for a single setting, and null strategy entries in a list. ``DSMoEConfig.sparse_settings``
    reads it back."""
    fields: dict[str, Any] = {}
    normalize = False
    for kind, settings in (("att", att), ("mlp", mlp)):
        if settings is None:
            continue
        if isinstance(settings, SparseSetting):
            fields[f"{kind}_strategy"] = settings.strategy
            fields[f"{kind}_k"] = settings.k
            fields[f"{kind}_threshold"] = settings.threshold
            normalize |= settings.normalize
            continue
        fields[f"{kind}_strategy"] = [None if s is None else s.strategy for s in settings]
        fields[f"{kind}_k"] = [None if s is None else s.k for s in settings]
        fields[f"{kind}_threshold"] = [None if s is None else s.threshold for s in settings]
        normalize |= any(s is not None and s.normalize for s in settings)
    if normalize:
        fields["normalize_weights"] = True
    return fields
