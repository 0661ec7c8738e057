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
``normalize_weights``: the flat fields of ``dsmoe.model.plan``, which reads every source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.model.plan import SparsePlan, Spelling
from dsmoe.model.settings import STRATEGIES, SparseSetting

SETTINGS_FORMAT = "dsmoe-sparse-settings"
SETTINGS_VERSION = 1
ENTRY_KEYS = ("strategy", "k", "threshold")
TOP_KEYS = ("format", "version", "n_layers", "att", "mlp", "normalize", "meta")


def load_plan(path: str | Path, cfg: ModelConfig) -> SparsePlan:
    """The plan a settings file gives a model with config ``cfg``.

    Raises ConfigError naming the file and the problem: unreadable JSON, a wrong number of layers, an unknown
    strategy, a k or threshold out of range for the model."""
    return plan_from_dict(read_settings_file(path), cfg, where=str(path))


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


def plan_from_dict(data: dict[str, Any], cfg: ModelConfig, where: str = "settings") -> SparsePlan:
    """The plan of a parsed settings file (see the module docstring): its entries become the flat fields that
    ``SparsePlan.parse`` reads from every source, and are checked there."""
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
    if "att" not in data and "mlp" not in data:
        raise ConfigError(f"{where} has neither 'att' nor 'mlp' settings")
    fields: dict[str, Any] = {"normalize_weights": data.get("normalize", False)}
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
        for i, entry in enumerate(entries):
            _check_entry(entry, f"{where}: {kind} layer {i}")
        for field in ENTRY_KEYS:
            fields[f"{kind}_{field}"] = [None if e is None else e.get(field) for e in entries]
    return SparsePlan.parse(fields, cfg, Spelling(_entry_name, where))


def _entry_name(field: str) -> str:
    """How the file spells a plan field: an entry's key ('mlp_k' -> 'k'), or 'normalize'."""
    return "normalize" if field == "normalize_weights" else field.split("_", 1)[1]


def _check_entry(entry: Any, where: str) -> None:
    """One layer's entry is null or an object of ENTRY_KEYS with a strategy (its values are checked by the plan)."""
    if entry is None:
        return
    if not isinstance(entry, dict):
        raise ConfigError(
            f'{where}: expected an object like {{"strategy": "threshold", "threshold": 1.0}} or null'
        )
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; an entry has {', '.join(ENTRY_KEYS)}"
        )
    if entry.get("strategy") is None:
        raise ConfigError(
            f"{where}: an entry needs a strategy ({', '.join(STRATEGIES)}); write null to run as trained"
        )


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


def plan_to_dict(plan: SparsePlan, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The file's JSON object for a plan: one entry per layer for both kinds."""
    normalize = {s.normalize for s in (*plan.att, *plan.mlp) if s is not None}
    if len(normalize) > 1:
        raise ValueError("a settings file has one normalize flag: the settings disagree on it")
    data: dict[str, Any] = {
        "format": SETTINGS_FORMAT,
        "version": SETTINGS_VERSION,
        "n_layers": len(plan.att),
        "att": [setting_entry(s) for s in plan.att],
        "mlp": [setting_entry(s) for s in plan.mlp],
        "normalize": normalize == {True},
    }
    if meta:
        data["meta"] = meta
    return data
