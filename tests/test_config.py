import pytest
from helpers import small_config

from dsmoe.config import PRESETS, ConfigError, ModelConfig, preset
from dsmoe.model.transformer import Transformer

# Paper Table 1 and Table 6, non-embedding parameters of the dense rows.
PAPER_DENSE = {
    "dense-1b": 1017e6,
    "dense-3b": 2705e6,
    "dense-6b": 6186e6,
    "dense-10b": 9667e6,
    "dense-14b": 13923e6,
    "dense-19b": 18951e6,
}


@pytest.mark.parametrize("name", sorted(PAPER_DENSE))
def test_dense_presets_match_paper_within_half_percent(name):
    ours = preset(name).non_embedding_params
    assert abs(ours / PAPER_DENSE[name] - 1) < 0.005


@pytest.mark.parametrize("size", ["1b", "3b", "6b"])
def test_ds_moe_partitions_dense_model_exactly(size):
    dense, ds = preset(f"dense-{size}"), preset(f"ds-moe-{size}")
    assert ds.n_query_heads == dense.n_query_heads
    assert ds.n_mlp_experts * ds.d_expert == dense.d_expert
    routers = ds.n_layers * ds.d_model * (ds.n_att_experts + ds.n_mlp_experts)
    assert ds.non_embedding_params == dense.non_embedding_params + routers


def test_paper_alphas_and_smoe_shapes():
    assert (preset("ds-moe-1b").alpha_att, preset("ds-moe-1b").alpha_mlp) == (3.5e-4, 6.3e-4)
    assert (preset("ds-moe-3b").alpha_att, preset("ds-moe-3b").alpha_mlp) == (2e-4, 4e-4)
    smoe = preset("smoe-5b")
    assert (smoe.n_mlp_experts, smoe.d_expert, smoe.smoe_top_k) == (16, 1536, 2)
    assert preset("ds-moe-10b").n_mlp_experts == 32 and preset("ds-moe-10b").d_expert == 640


def test_tiny_presets_are_matched_like_table_1():
    dense, smoe, ds = preset("tiny-dense"), preset("tiny-smoe"), preset("tiny-ds-moe")
    for cfg in (dense, smoe, ds):
        assert cfg.non_embedding_params <= 10_000_000
    assert abs(ds.non_embedding_params / dense.non_embedding_params - 1) < 0.01  # only the routers differ
    mlp = lambda c: c.n_mlp_experts * c.mlp_expert_params
    assert mlp(smoe) == 2 * mlp(dense)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_counted_parameters_equal_the_built_model(name):
    cfg = preset(name)
    if cfg.total_params > 50e6:
        cfg = cfg.replace(
            d_model=64, n_layers=2, head_dim=8, d_expert=max(2, cfg.d_expert // 256), vocab_size=50
        )
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.total_params


def test_active_params_and_hidden():
    cfg = preset("ds-moe-6b")
    assert cfg.active_params() == cfg.non_embedding_params
    assert cfg.active_hidden() == 1.0
    k4 = cfg.active_hidden(att_active=8, mlp_active=4)
    mlp_share = 32 * cfg.mlp_expert_params / (32 * cfg.mlp_expert_params + 8 * cfg.att_expert_params)
    assert k4 == pytest.approx(1 - mlp_share * 28 / 32)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_kv_heads=3), "not divisible by n_kv_heads=3"),
        (dict(regime="moe"), "unknown regime 'moe'"),
        (dict(regime="dense"), "regime 'dense' has one attention and one MLP expert"),
        (dict(d_model=0), "d_model must be a positive integer"),
        (dict(alpha_mlp=-1.0), "alpha_mlp must be >= 0"),
        (dict(activation="relu"), "unknown activation 'relu'"),
        (dict(head_dim=7), "head_dim must be even"),
    ],
)
def test_config_validation_messages(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**small_config().to_dict(), **overrides})


def test_smoe_top_k_larger_than_experts_is_rejected():
    with pytest.raises(ConfigError, match="smoe_top_k=9 is larger than n_mlp_experts=8"):
        small_config("smoe", smoe_top_k=9)


def test_unknown_keys_suggest_the_right_one():
    values = {**small_config().to_dict(), "n_mlp_expert": 4}
    with pytest.raises(ConfigError, match="Did you mean 'n_mlp_experts'"):
        ModelConfig.from_dict(values)
    with pytest.raises(ConfigError, match="Did you mean 'ds-moe-6b'"):
        preset("ds-moe-6")
    assert ModelConfig.from_dict(small_config().to_dict()) == small_config()
