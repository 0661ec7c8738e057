"""Shared test helpers (tests/ is on pytest's pythonpath)."""

from dsmoe.config import ModelConfig


def small_config(regime: str = "dsmoe", **overrides) -> ModelConfig:
    """A few-thousand-parameter model that still has every feature: MoA with GQA, several MLP experts."""
    base = dict(d_model=32, n_layers=2, n_att_experts=4, n_heads_per_expert=2, head_dim=8, n_kv_heads=2,
                n_mlp_experts=8, d_expert=16, vocab_size=97, max_seq_len=64, regime=regime,
                alpha_att=1e-2, alpha_mlp=1e-2)
    if regime == "dense":
        base.update(n_att_experts=1, n_heads_per_expert=8, n_mlp_experts=1, d_expert=128)
    if regime == "smoe":
        base.update(n_att_experts=1, n_heads_per_expert=8)
    base.update(overrides)
    return ModelConfig(**base)
