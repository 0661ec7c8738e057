"""The three models the throughput benchmark compares, matched as in the paper's Table 6, scaled down.

Table 6 keeps 32 query heads, head size D/32 and 4 shared K/V heads, and sets the dense FFN to 4D. From that shape:
* Dense: one attention expert of 32 heads, one MLP of width 4D.
* SMoE: dense attention, 16 MLP experts of width 4D/8 (twice the Dense MLP's parameters), top-2 per token.
* DS-MoE: 8 attention experts of 4 heads, 32 MLP experts of width 4D/32 (the Dense model's parameters plus
  routers), top-K = 4 MLP experts per token; attention dense, as in the paper's speed test (sec. 4.4).
The same scaling (width, depth, vocabulary) is applied to all three.

The ``llama`` shape is the same three models in the layout of transformers' Llama and OLMoE, so that ``--peers`` can
build those at the same size: SwiGLU MLPs, RMSNorm, 16 query heads of D/16 with 4 K/V heads, and a dense FFN of
8D/3 rounded up to a multiple of 256 (Llama's rule: 2,816 at D = 1,024), which the experts split as above (SMoE
16 x FFN/8, DS-MoE 32 x FFN/32 = 88 units at D = 1,024; DS-MoE's 8 attention experts hold 2 heads each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsmoe.bench.settings import SHAPES
from dsmoe.config import ConfigError, ModelConfig
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting


@dataclass(frozen=True)
class BenchModel:
    name: str
    cfg: ModelConfig
    att: SparseSetting | None  # inference setting of the attention routers (None: trained behaviour)
    mlp: SparseSetting | None

    @property
    def plan(self) -> SparsePlan:
        return SparsePlan.build(self.cfg, self.att, self.mlp)


def llama_ffn(d_model: int) -> int:
    """Llama's SwiGLU width for a model of width ``d_model``: 8D/3 rounded up to a multiple of 256."""
    return -(-(8 * d_model // 3) // 256) * 256


def bench_models(
    d_model: int,
    n_layers: int,
    vocab_size: int,
    max_seq_len: int,
    mlp_k: int = 4,
    att_k: int | None = None,
    shape: str = "table6",
) -> list[BenchModel]:
    """Dense, SMoE and DS-MoE of Table 6's shape (or its ``llama`` layout) at width ``d_model``, depth ``n_layers``."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape '{shape}': choose one of {', '.join(SHAPES)}")
    n_heads = 32 if shape == "table6" else 16
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise ConfigError(
            f"d_model must be a multiple of {2 * n_heads} ({n_heads} heads of an even size), got {d_model}"
        )
    if not 1 <= mlp_k <= 32:
        raise ConfigError(f"--mlp-k must be between 1 and the 32 MLP experts of DS-MoE, got {mlp_k}")
    if att_k is not None and not 1 <= att_k <= 8:
        raise ConfigError(f"--att-k must be between 1 and the 8 attention experts of DS-MoE, got {att_k}")
    ffn = 4 * d_model if shape == "table6" else llama_ffn(d_model)
    shared: dict[str, Any] = dict(  # the ModelConfig fields all three models share
        d_model=d_model,
        n_layers=n_layers,
        head_dim=d_model // n_heads,
        n_kv_heads=4,
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
    )
    if shape == "llama":
        shared.update(activation="swiglu", norm="rmsnorm")
    dense = ModelConfig(
        **shared, n_att_experts=1, n_heads_per_expert=n_heads, n_mlp_experts=1, d_expert=ffn, regime="dense"
    )
    smoe = ModelConfig(
        **shared,
        n_att_experts=1,
        n_heads_per_expert=n_heads,
        n_mlp_experts=16,
        d_expert=ffn // 8,
        regime="smoe",
        smoe_top_k=2,
    )
    dsmoe = ModelConfig(
        **shared,
        n_att_experts=8,
        n_heads_per_expert=n_heads // 8,
        n_mlp_experts=32,
        d_expert=ffn // 32,
        regime="dsmoe",
    )
    att = SparseSetting("topk", k=att_k) if att_k is not None else None
    return [
        BenchModel("dense", dense, None, None),
        BenchModel("smoe", smoe, None, None),
        BenchModel("ds-moe", dsmoe, att, SparseSetting("topk", k=mlp_k)),
    ]
