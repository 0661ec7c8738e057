"""The sparse plan: how every MoE layer picks its experts at inference, as one frozen value that the forward takes as
an argument (``model(idx, plan=plan)``). No layer holds a setting; a model run without a plan runs as trained.

Every source of settings is read by one parser, ``SparsePlan.parse``, into this one value, and checked by one
validator (``check_setting``) with one style of error: the command line's flags (``--strategy``, ``--k``, ...),
lm-eval's ``model_args``, a Hugging Face config's fields and a settings file (``settings_file.py``) differ only in
how they spell a field (``Spelling``). Torch-free, so that the command line can check settings before it imports
anything heavy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.model.settings import (
    AUTO_KERNELS,
    STRATEGIES,
    Kernels,
    SparseSetting,
    describe_setting,
    trained_setting,
)

KINDS = ("att", "mlp")
# The fields of a plan in its flat form: one value for every layer, or a list with one value per layer; the names of
# the sparse fields of a Hugging Face config.json.
FIELDS = (
    "att_strategy",
    "att_k",
    "att_threshold",
    "mlp_strategy",
    "mlp_k",
    "mlp_threshold",
    "normalize_weights",
)

LayerSettings = SparseSetting | Sequence[SparseSetting | None] | None


@dataclass(frozen=True)
class Spelling:
    """How a source names a plan's fields in its errors (``name``: e.g. 'mlp_k' -> '--k'), what it is called
    (``where``), whether it writes every value as text (``text``: lm-eval's model_args), so that numbers and booleans
    are read from strings, and how a user gives a field there (``how``)."""

    name: Callable[[str], str] = str
    where: str = "the sparse settings"
    text: bool = False
    how: str = "set {name}"  # how to give a field in this source

    def give(self, field: str) -> str:
        return self.how.format(name=self.name(field))


FLAGS = Spelling(
    lambda field: "--" + field.replace("mlp_", "").replace("_", "-"), "the command line", how="pass {name} N"
)


@dataclass(frozen=True)
class SparsePlan:
    """Per layer, the attention and MLP settings (None: the layer runs as trained); ``trained`` is what that means for
    this model (every expert for Dense and DS-MoE, the trained top-k for an SMoE); ``kernels``: which implementation
    computes the selected experts (``with_kernels`` sets it)."""

    att: tuple[SparseSetting | None, ...]
    mlp: tuple[SparseSetting | None, ...]
    trained: SparseSetting
    kernels: Kernels = AUTO_KERNELS

    def setting(self, kind: str, layer: int) -> SparseSetting:
        """What layer ``layer``'s ``kind`` ('att' or 'mlp') router runs."""
        return getattr(self, kind)[layer] or self.trained

    def given(self, kind: str) -> SparseSetting | list[SparseSetting | None] | None:
        """The settings of one kind as given: None when every layer runs as trained, one setting when all layers
        share it, else one per layer."""
        layers = getattr(self, kind)
        if all(s == layers[0] for s in layers):
            return layers[0]
        return list(layers)

    def describe(self, kind: str) -> str:
        """'trained', 'topk(k=2)', 'threshold(eps=1.0)' or 'per-layer[...]'."""
        return describe_setting(self.given(kind))

    def with_kernels(self, impl: str | None = None, *, compiled: bool | None = None) -> SparsePlan:
        """This plan with another kernel choice (see ``Kernels``): ``impl`` and/or ``compiled`` changed."""
        kernels = Kernels(
            self.kernels.impl if impl is None else impl,
            self.kernels.compiled if compiled is None else compiled,
        )
        return dataclasses.replace(self, kernels=kernels)

    @property
    def is_trained(self) -> bool:
        return not any(self.att) and not any(self.mlp)

    @classmethod
    def build(cls, cfg: ModelConfig, att: LayerSettings = None, mlp: LayerSettings = None) -> SparsePlan:
        """The plan of settings given as objects: for each kind one SparseSetting for every layer, a list with one
        per layer, or None (as trained). Checked against the model (a k above a layer's experts, a wrong length)."""
        return cls.parse(fields_of(att, mlp), cfg)

    @classmethod
    def parse(
        cls, values: Mapping[str, Any], cfg: ModelConfig, spelling: Spelling = Spelling()
    ) -> SparsePlan:
        """The plan of the flat fields (FIELDS; missing ones are None), each one value or a list with one per layer.
        Where the source writes text (``spelling.text``), numbers and booleans are read from strings. A layer whose
        strategy is None runs as trained, and then takes no k or threshold."""
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise ConfigError(
                f"{spelling.where}: unknown sparse setting(s) {', '.join(map(spelling.name, unknown))}; choose "
                f"from {', '.join(map(spelling.name, FIELDS))}"
            )
        normalize = values.get("normalize_weights")
        normalize = (
            False if normalize is None else _boolean(normalize, spelling.name("normalize_weights"), spelling)
        )
        layers = {}
        for kind in KINDS:
            given = [values.get(f"{kind}_{f}") for f in ENTRY]
            if not any(isinstance(v, (list, tuple)) for v in given):  # one setting for every layer
                one = check_setting(kind, given[0], given[1], given[2], normalize, cfg, None, spelling)
                layers[kind] = (one,) * cfg.n_layers
                continue
            strategy, k, threshold = (
                _layer_values(v, f"{kind}_{f}", cfg, spelling) for v, f in zip(given, ENTRY, strict=True)
            )
            layers[kind] = tuple(
                check_setting(kind, strategy[i], k[i], threshold[i], normalize, cfg, i, spelling)
                for i in range(cfg.n_layers)
            )
        return cls(layers["att"], layers["mlp"], trained_setting(cfg.regime, cfg.smoe_top_k))

    def fields(self) -> dict[str, Any]:
        """The flat form (``parse`` reads it back): one value per field where all layers agree, else lists; fields
        of kinds that run as trained are left out, and ``normalize_weights`` appears only when set."""
        return fields_of(self.given("att"), self.given("mlp"))


ENTRY = ("strategy", "k", "threshold")


@functools.cache
def trained_plan(cfg: ModelConfig) -> SparsePlan:
    """The plan of a model run as trained (what a forward without a plan runs)."""
    return SparsePlan.build(cfg)


def fields_of(att: LayerSettings, mlp: LayerSettings) -> dict[str, Any]:
    """The flat fields of (att, mlp) settings: for a kind with one setting, its strategy, k and threshold; with a list,
    one value per layer (None where a layer runs as trained); ``normalize_weights`` when any setting normalizes."""
    out: dict[str, Any] = {}
    normalize = False
    for kind, settings in (("att", att), ("mlp", mlp)):
        if settings is None:
            continue
        if isinstance(settings, SparseSetting):
            out.update({f"{kind}_{f}": getattr(settings, f) for f in ENTRY})
            normalize |= settings.normalize
            continue
        out.update({f"{kind}_{f}": [None if s is None else getattr(s, f) for s in settings] for f in ENTRY})
        normalize |= any(s is not None and s.normalize for s in settings)
    if normalize:
        out["normalize_weights"] = True
    return out


def _layer_values(value: Any, field: str, cfg: ModelConfig, spelling: Spelling) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        return [value] * cfg.n_layers
    if len(value) != cfg.n_layers:
        raise ConfigError(
            f"{spelling.where}: {spelling.name(field)} has {len(value)} entries for a model with {cfg.n_layers} "
            "layers; give one value for all layers or one per layer"
        )
    return list(value)


def _boolean(value: Any, name: str, spelling: Spelling) -> bool:
    if isinstance(value, bool):
        return value
    if spelling.text and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{spelling.where}: {name} must be true or false, got {value!r}")


def _read(value: Any, kind: type) -> Any:
    """A value of a source that writes everything as text (lm-eval's model_args): 'none' and '' are None."""
    if not isinstance(value, str) or value.lower() in ("", "none", "null"):
        return None if isinstance(value, str) else value
    try:
        return kind(value)
    except ValueError:
        return value


def check_setting(
    kind: str,
    strategy: Any,
    k: Any,
    threshold: Any,
    normalize: bool,
    cfg: ModelConfig,
    layer: int | None,
    spelling: Spelling = Spelling(),
) -> SparseSetting | None:
    """The one validator: the ``kind`` setting of layer ``layer`` (None: of every layer), or None (as trained) when no
    strategy is given.

    topk takes an integer k in 1..N (the layer's experts) and no threshold; threshold and threshold_topk a threshold
    in (0, N] (it compares S_i * N, so above N only the top expert is ever kept) and no k; dense neither."""
    n = cfg.n_att_experts if kind == "att" else cfg.n_mlp_experts
    name = spelling.name
    if spelling.text:
        strategy, k, threshold = _read(strategy, str), _read(k, int), _read(threshold, float)
    where = f"{spelling.where}: {kind}" + ("" if layer is None else f" layer {layer}")
    if strategy is None:
        for field, value in (("k", k), ("threshold", threshold)):
            if value is not None:
                raise ConfigError(
                    f"{where}: {name(f'{kind}_{field}')} needs {name(f'{kind}_strategy')} (topk, threshold or "
                    "threshold_topk) to apply to"
                )
        return None
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"{where}: unknown sparse strategy {strategy!r} ({name(f'{kind}_strategy')}); choose one of "
            f"{', '.join(STRATEGIES)}"
        )
    if n == 1:  # no router: the one expert always runs, whatever the setting
        return None
    if strategy == "topk":
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigError(
                f"{where}: strategy 'topk' needs an integer k in 1..{n} (the layer's {n} experts), got k={k!r}; "
                f"{spelling.give(f'{kind}_k')}"
            )
    elif k is not None:
        raise ConfigError(
            f"{where}: k is read by strategy 'topk' only, not {strategy!r}; drop {name(f'{kind}_k')}"
        )
    if strategy in ("threshold", "threshold_topk"):
        number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
        if not (number and math.isfinite(threshold) and 0 < threshold <= n):
            raise ConfigError(
                f"{where}: strategy {strategy!r} needs a threshold in (0, {n}] (it compares S_i * N_experts, so "
                f"1.0 means 'above uniform'; above {n} only the top expert is ever kept), got {threshold!r}; "
                f"{spelling.give(f'{kind}_threshold')}"
            )
        threshold = float(threshold)
    elif threshold is not None:
        raise ConfigError(
            f"{where}: the threshold is read by the threshold strategies only, not {strategy!r}; drop "
            f"{name(f'{kind}_threshold')}"
        )
    return SparseSetting(strategy, k=k, threshold=threshold, normalize=normalize)
