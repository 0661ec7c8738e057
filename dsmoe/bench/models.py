"""The three models the throughput benchmark compares, matched as in the paper's Table 6, scaled down.

Table 6 keeps 32 query heads, head size D/32 and 4 shared K/V heads, and sets the dense FFN to 4D. From that shape:
* Dense: one attention expert of 32 heads, one MLP of width 4D.
* SMoE: dense attention, 16 MLP experts of width 4D/8 (twice the Dense MLP's parameters), top-2 per token.
* DS-MoE: 8 attention experts of 4 heads, 32 MLP experts of width 4D/32 (the Dense model's parameters plus
  routers), top-K = 4 MLP experts per token; attention dense, as in the paper's speed test (sec. 4.4); with
  ``att_k``, also a "ds-moe+att" row whose attention runs its top ``att_k`` experts.
The same scaling (width, depth, vocabulary) is applied to all three.

Named sizes (``size``, see ``dsmoe.bench.settings.PAPER_SIZES``) are the paper's own models instead, per layer exactly:
Table 1's Dense / SMoE / DS-MoE-1B, -3B (SMoE-5B), -6B (an SMoE by Table 6's rule: no 6B SMoE was trained) and
Table 6's 10B/14B/19B, at ``n_layers`` layers and the benchmark's vocabulary. Their ``llama`` layout swaps in SwiGLU
and RMSNorm and keeps every width, so each SwiGLU expert has 1.5x the parameters of its GeLU one; at 1B it is
Llama-3.2-1B's layer (width 2,048, FFN 8,192, 32 query heads of 64) with 2 K/V heads instead of 8.

The toy ``llama`` shape is the same three models in the layout of transformers' Llama and OLMoE, so that ``--peers`` can
build those at the same size: SwiGLU MLPs, RMSNorm, 16 query heads of D/16 with 4 K/V heads, and a dense FFN of
8D/3 rounded up to a multiple of 256 (Llama's rule: 2,816 at D = 1,024), which the experts split as above (SMoE
16 x FFN/8, DS-MoE 32 x FFN/32 = 88 units at D = 1,024; DS-MoE's 8 attention experts hold 2 heads each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsmoe.bench.settings import PAPER_SIZES, SHAPES, SIZES
from dsmoe.config import ConfigError, ModelConfig, preset
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
    size: str = "toy",
) -> list[BenchModel]:
    """Dense, SMoE and DS-MoE of Table 6's shape (or its ``llama`` layout) at width ``d_model``, depth ``n_layers``;
    or, for a named ``size``, the paper's models of that size (``d_model`` is then theirs)."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape '{shape}': choose one of {', '.join(SHAPES)}")
    if size not in SIZES:
        raise ConfigError(f"unknown size '{size}': choose one of {', '.join(SIZES)}")
    if size != "toy":
        return paper_models(size, n_layers, vocab_size, max_seq_len, mlp_k, att_k, shape)
    n_heads = 32 if shape == "table6" else 16
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise ConfigError(
            f"d_model must be a multiple of {2 * n_heads} ({n_heads} heads of an even size), got {d_model}"
        )
    _check_k(mlp_k, att_k, n_mlp=32, n_att=8)
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
    return _trio(dense, smoe, dsmoe, mlp_k, att_k)


def _check_k(mlp_k: int, att_k: int | None, n_mlp: int, n_att: int) -> None:
    if not 1 <= mlp_k <= n_mlp:
        raise ConfigError(f"--mlp-k must be between 1 and the {n_mlp} MLP experts of DS-MoE, got {mlp_k}")
    if att_k is not None and not 1 <= att_k <= n_att:
        raise ConfigError(
            f"--att-k must be between 1 and the {n_att} attention experts of DS-MoE, got {att_k}"
        )


def _trio(
    dense: ModelConfig, smoe: ModelConfig, dsmoe: ModelConfig, mlp_k: int, att_k: int | None
) -> list[BenchModel]:
    """The three models; with ``att_k``, DS-MoE twice: MLP-only sparsity ("ds-moe", attention dense as in the
    paper's speed test) and "ds-moe+att", its attention routed to the top ``att_k`` experts too."""
    mlp = SparseSetting("topk", k=mlp_k)
    models = [
        BenchModel("dense", dense, None, None),
        BenchModel("smoe", smoe, None, None),
        BenchModel("ds-moe", dsmoe, None, mlp),
    ]
    if att_k is not None:
        models.append(BenchModel("ds-moe+att", dsmoe, SparseSetting("topk", k=att_k), mlp))
    return models


def paper_models(
    size: str, n_layers: int, vocab_size: int, max_seq_len: int, mlp_k: int, att_k: int | None, shape: str
) -> list[BenchModel]:
    """The paper's Dense, SMoE and DS-MoE of ``size`` (PAPER_SIZES), ``n_layers`` deep, in the layout ``shape``."""
    dense_name, smoe_name, dsmoe_name = PAPER_SIZES[size]
    common: dict[str, Any] = dict(n_layers=n_layers, vocab_size=vocab_size, max_seq_len=max_seq_len)
    if shape == "llama":
        common.update(activation="swiglu", norm="rmsnorm")
    dense = preset(dense_name, **common)
    if smoe_name is not None:
        smoe = preset(smoe_name, **common)
    else:  # Table 6's rule: twice the dense MLP's parameters in 16 experts, top-2
        smoe = preset(
            dense_name, **common, regime="smoe", n_mlp_experts=16, d_expert=dense.d_expert // 8, smoe_top_k=2
        )
    dsmoe = preset(dsmoe_name, **common)
    _check_k(mlp_k, att_k, n_mlp=dsmoe.n_mlp_experts, n_att=dsmoe.n_att_experts)
    return _trio(dense, smoe, dsmoe, mlp_k, att_k)
