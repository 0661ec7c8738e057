"""Model configuration: one dataclass for Dense, SMoE and DS-MoE, validated on construction, that counts its own
parameters; and the paper's presets by name (Tables 1, 2 and 6) plus tiny CPU sizes."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

REGIMES = ("dense", "smoe", "dsmoe")
ACTIVATIONS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")

# CodeGen's tokenizer has 50,295 entries; CodeGen checkpoints pad the embedding to 51,200 and so do we.
CODEGEN_VOCAB = 51200


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and how to fix it."""


def unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(known))}."
    return ConfigError(f"unknown key '{key}' in {where}.{hint}")


def coerce_numbers(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string: turn strings into the int/float a field declares."""
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        if kinds.get(key) in ("int", "float") and isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{key} in {where} must be a number, got '{value}'") from None
            out[key] = int(number) if kinds[key] == "int" and number.is_integer() else number
    return out


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters in the paper's notation (Table 1).

    d_model = D_emb; n_att_experts = N_att, each with n_heads_per_expert = N_head query heads of size head_dim = D_att;
    n_kv_heads key/value heads shared by all attention experts (GQA); n_mlp_experts = N_ffd, each of width d_expert =
    D_ffd. A Dense model is the same network with one attention and one MLP expert and no routers.
    """

    d_model: int
    n_layers: int
    n_att_experts: int
    n_heads_per_expert: int
    head_dim: int
    n_kv_heads: int
    n_mlp_experts: int
    d_expert: int
    regime: str = "dsmoe"
    vocab_size: int = CODEGEN_VOCAB
    max_seq_len: int = 2048
    alpha_att: float = 0.0  # MI-loss weight for attention routers (DS-MoE)
    alpha_mlp: float = 0.0  # MI-loss weight for MLP routers (DS-MoE)
    smoe_top_k: int = 2  # experts per token for SMoE, in training and inference
    switch_loss_weight: float = 0.01  # SMoE load-balancing weight on the mean over layers (dMoE: 0.01 too)
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
            if f.type == "str" and not isinstance(value, str):
                raise ConfigError(f"{f.name} must be a string, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be true or false, got {value!r}")
        for name in (
            "d_model",
            "n_layers",
            "n_att_experts",
            "n_heads_per_expert",
            "head_dim",
            "n_kv_heads",
            "n_mlp_experts",
            "d_expert",
            "vocab_size",
            "max_seq_len",
            "smoe_top_k",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.regime not in REGIMES:
            raise ConfigError(f"unknown regime '{self.regime}': choose one of {', '.join(REGIMES)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation '{self.activation}': choose one of {', '.join(ACTIVATIONS)}"
            )
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm '{self.norm}': choose one of {', '.join(NORMS)}")
        if self.n_query_heads % self.n_kv_heads:
            raise ConfigError(
                f"the {self.n_query_heads} query heads (n_att_experts x n_heads_per_expert) are not divisible by "
                f"n_kv_heads={self.n_kv_heads}: pick n_kv_heads that divides {self.n_query_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary positions, got {self.head_dim}")
        if self.regime == "dense" and (self.n_att_experts != 1 or self.n_mlp_experts != 1):
            raise ConfigError(
                "regime 'dense' has one attention and one MLP expert: set n_att_experts=1 and n_mlp_experts=1 "
                f"(got {self.n_att_experts} and {self.n_mlp_experts}), or choose regime 'dsmoe' or 'smoe'"
            )
        if self.regime != "dense" and self.n_att_experts == 1 and self.n_mlp_experts == 1:
            raise ConfigError(
                f"regime '{self.regime}' needs more than one expert in attention or MLP; "
                "raise n_mlp_experts or use regime 'dense'"
            )
        if self.regime == "smoe":
            for name, n in (("n_mlp_experts", self.n_mlp_experts), ("n_att_experts", self.n_att_experts)):
                if n > 1 and self.smoe_top_k > n:
                    raise ConfigError(
                        f"smoe_top_k={self.smoe_top_k} is larger than {name}={n}: lower smoe_top_k"
                    )
        for name in ("alpha_att", "alpha_mlp", "switch_loss_weight", "init_std"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("norm_eps and rope_theta must be > 0")

    # ----- derived sizes -----
    @property
    def n_query_heads(self) -> int:
        return self.n_att_experts * self.n_heads_per_expert

    @property
    def att_expert_dim(self) -> int:
        """Query width owned by one attention expert: N_head * D_att."""
        return self.n_heads_per_expert * self.head_dim

    @property
    def has_att_router(self) -> bool:
        return self.n_att_experts > 1

    @property
    def has_mlp_router(self) -> bool:
        return self.n_mlp_experts > 1

    # ----- parameter accounting (the paper counts non-embedding parameters) -----
    @property
    def norm_params(self) -> int:
        return 2 * self.d_model if self.norm == "layernorm" else self.d_model

    @property
    def att_expert_params(self) -> int:
        """One attention expert: its query slice and its output-projection slice."""
        return 2 * self.d_model * self.att_expert_dim

    @property
    def mlp_expert_params(self) -> int:
        n_mats = 3 if self.activation == "swiglu" else 2
        return n_mats * self.d_model * self.d_expert

    @property
    def layer_shared_params(self) -> int:
        """Parameters every token uses in a block whatever the routing: K/V projections, routers, norms."""
        kv = 2 * self.d_model * self.n_kv_heads * self.head_dim
        routers = self.d_model * (
            self.n_att_experts * self.has_att_router + self.n_mlp_experts * self.has_mlp_router
        )
        return kv + routers + 2 * self.norm_params

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

    @property
    def non_embedding_params(self) -> int:
        per_layer = (
            self.layer_shared_params
            + self.n_att_experts * self.att_expert_params
            + self.n_mlp_experts * self.mlp_expert_params
        )
        return self.n_layers * per_layer + self.norm_params  # + final norm

    @property
    def total_params(self) -> int:
        return self.non_embedding_params + self.embedding_params

    def active_params(
        self, att_active: list[float] | float | None = None, mlp_active: list[float] | float | None = None
    ) -> float:
        """Non-embedding parameters one token uses, given the mean number of active attention / MLP experts per
        token in each layer (a number for all layers, a list per layer, or None for all experts)."""
        att = _per_layer(att_active, self.n_att_experts, self.n_layers)
        mlp = _per_layer(mlp_active, self.n_mlp_experts, self.n_layers)
        return float(
            sum(
                self.layer_shared_params + a * self.att_expert_params + m * self.mlp_expert_params
                for a, m in zip(att, mlp, strict=True)
            )
            + self.norm_params
        )

    def active_hidden(
        self, att_active: list[float] | float | None = None, mlp_active: list[float] | float | None = None
    ) -> float:
        """Fraction of expert hidden units in use (attention heads' query/output units and MLP units), weighted by
        their parameters. A Dense model, or all experts, is 1.0."""
        att = _per_layer(att_active, self.n_att_experts, self.n_layers)
        mlp = _per_layer(mlp_active, self.n_mlp_experts, self.n_layers)
        used = sum(
            a * self.att_expert_params + m * self.mlp_expert_params for a, m in zip(att, mlp, strict=True)
        )
        full = self.n_layers * (
            self.n_att_experts * self.att_expert_params + self.n_mlp_experts * self.mlp_expert_params
        )
        return used / full

    # ----- (de)serialisation -----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                raise unknown_key_error(key, known, "the model config")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        ]
        if missing:
            raise ConfigError(f"model config is missing required field(s): {', '.join(missing)}")
        return cls(**coerce_numbers(cls, values, "the model config"))

    def replace(self, **changes: Any) -> ModelConfig:
        known = [f.name for f in dataclasses.fields(self)]
        for key in changes:
            if key not in known:
                raise unknown_key_error(key, known, "the model config")
        return dataclasses.replace(self, **changes)


def _per_layer(value: list[float] | float | None, n_experts: int, n_layers: int) -> list[float]:
    if value is None:
        return [float(n_experts)] * n_layers
    if isinstance(value, (int, float)):
        return [float(value)] * n_layers
    if len(value) != n_layers:
        raise ConfigError(f"expected one active-expert count per layer ({n_layers}), got {len(value)}")
    return [float(v) for v in value]


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    d_model: int
    n_layers: int
    head_dim: int
    n_kv_heads: int
    d_ffn: int  # width of the dense model's FFN; experts split it
    alpha_att: float = 0.0
    alpha_mlp: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _dense(s: _Shape) -> dict[str, Any]:
    return dict(
        d_model=s.d_model,
        n_layers=s.n_layers,
        n_att_experts=1,
        n_heads_per_expert=32,
        head_dim=s.head_dim,
        n_kv_heads=s.n_kv_heads,
        n_mlp_experts=1,
        d_expert=s.d_ffn,
        regime="dense",
        **s.extra,
    )


def _dsmoe(s: _Shape, n_att: int, n_mlp: int = 32) -> dict[str, Any]:
    return dict(
        d_model=s.d_model,
        n_layers=s.n_layers,
        n_att_experts=n_att,
        n_heads_per_expert=32 // n_att,
        head_dim=s.head_dim,
        n_kv_heads=s.n_kv_heads,
        n_mlp_experts=n_mlp,
        d_expert=s.d_ffn // n_mlp,
        regime="dsmoe",
        alpha_att=s.alpha_att,
        alpha_mlp=s.alpha_mlp,
        **s.extra,
    )


def _smoe(s: _Shape, n_mlp: int, d_expert: int) -> dict[str, Any]:
    return dict(
        d_model=s.d_model,
        n_layers=s.n_layers,
        n_att_experts=1,
        n_heads_per_expert=32,
        head_dim=s.head_dim,
        n_kv_heads=s.n_kv_heads,
        n_mlp_experts=n_mlp,
        d_expert=d_expert,
        regime="smoe",
        smoe_top_k=2,
        **s.extra,
    )


# Table 1 (GQA: 2 shared K/V heads at 1B, 4 at 3B and 6B) with Table 2's MI-loss weights.
_S1B = _Shape(2048, 24, 64, 2, 8192, alpha_att=3.5e-4, alpha_mlp=6.3e-4)
_S3B = _Shape(3072, 28, 96, 4, 12288, alpha_att=2e-4, alpha_mlp=4e-4)
_S6B = _Shape(4096, 36, 128, 4, 16384, alpha_att=2e-4, alpha_mlp=2e-4)
# Table 6: 36 layers, 32 query heads in all, 4 K/V heads (this reproduces the table's totals); the paper gives no
# alpha for these speed-test shapes, so they take DS-MoE-6B's.
_S10B = _Shape(5120, 36, 160, 4, 20480, alpha_att=2e-4, alpha_mlp=2e-4)
_S14B = _Shape(6144, 36, 192, 4, 24576, alpha_att=2e-4, alpha_mlp=2e-4)
_S19B = _Shape(7168, 36, 224, 4, 28672, alpha_att=2e-4, alpha_mlp=2e-4)

# Tiny CPU sizes, matched like Table 1: Dense and DS-MoE have equal totals (DS-MoE adds only routers), SMoE has
# twice the MLP parameters and activates top-2 of 8 (half the dense MLP width per token).
_TINY = dict(d_model=256, n_layers=6, head_dim=32, n_kv_heads=2, vocab_size=8192, max_seq_len=256)

PRESETS: dict[str, dict[str, Any]] = {
    "dense-1b": _dense(_S1B),
    "dense-3b": _dense(_S3B),
    "dense-6b": _dense(_S6B),
    "smoe-1b": _smoe(_S1B, 8, 1024),
    "smoe-1.5b": _smoe(_S1B, 12, 1024),
    "smoe-5b": _smoe(_S3B, 16, 1536),
    "ds-moe-1b": _dsmoe(_S1B, n_att=16),
    "ds-moe-3b": _dsmoe(_S3B, n_att=8),
    "ds-moe-6b": _dsmoe(_S6B, n_att=8),
    "dense-10b": _dense(_S10B),
    "dense-14b": _dense(_S14B),
    "dense-19b": _dense(_S19B),
    "smoe-17b": _smoe(_S10B, 16, 2560),
    "smoe-25b": _smoe(_S14B, 16, 3072),
    "smoe-34b": _smoe(_S19B, 16, 3584),
    "ds-moe-10b": _dsmoe(_S10B, n_att=8),
    "ds-moe-14b": _dsmoe(_S14B, n_att=8),
    "ds-moe-19b": _dsmoe(_S19B, n_att=8),
    "tiny-dense": dict(
        _TINY, n_att_experts=1, n_heads_per_expert=8, n_mlp_experts=1, d_expert=1024, regime="dense"
    ),
    "tiny-smoe": dict(
        _TINY,
        n_att_experts=1,
        n_heads_per_expert=8,
        n_mlp_experts=8,
        d_expert=256,
        regime="smoe",
        smoe_top_k=2,
    ),
    "tiny-ds-moe": dict(
        _TINY,
        n_att_experts=4,
        n_heads_per_expert=2,
        n_mlp_experts=16,
        d_expert=64,
        regime="dsmoe",
        alpha_att=1e-3,
        alpha_mlp=1e-3,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with optional field overrides."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'.{hint} Available: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
