"""Training a converted model through the existing trainer: init_from, trainable=routers, exact resume."""

import shutil

import pytest
import torch
from helpers import prepared_data, tiny_train_config

from dsmoe.config import ConfigError
from dsmoe.convert.commands import convert
from dsmoe.training import checkpoint as ckpt
from dsmoe.training.config import load_train_config
from dsmoe.training.loop import train

transformers = pytest.importorskip(
    "transformers", reason="converting needs transformers (pip install 'dsmoe[hf]')"
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(prepared data, a tiny random Llama converted to DS-MoE with the data's tokenizer)."""
    root = tmp_path_factory.mktemp("converted")
    data = prepared_data(root / "corpus")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=384,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )
    hf.save_pretrained(root / "hf")
    shutil.copyfile(data / "tokenizer.json", root / "hf" / "tokenizer.json")
    convert(str(root / "hf"), root / "ckpt", mlp_experts=4, att_experts=2, alpha_att=1e-2, alpha_mlp=1e-2)
    return data, root / "ckpt"


def run_config(data, init, out, **overrides):
    return tiny_train_config(data, out, **{"model": {}, "init_from": str(init), **overrides})


def test_router_only_training_changes_only_routers_and_resumes_exactly(converted, tmp_path):
    data, init = converted
    start = ckpt.load_model_state(init)
    full = run_config(data, init, tmp_path / "full", trainable="routers", total_tokens=256 * 3, eval_every=0)
    train(full)
    pieces = run_config(
        data, init, tmp_path / "pieces", trainable="routers", total_tokens=256 * 3, eval_every=0
    )
    train(pieces, max_steps=1)
    train(pieces, resume=True)
    a = ckpt.load_model_state(ckpt.list_checkpoints(full.out_dir)[-1])
    b = ckpt.load_model_state(ckpt.list_checkpoints(pieces.out_dir)[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = {k for k in a if not torch.equal(a[k], start[k])}
    assert changed == {k for k in a if ".router." in k}
    assert len(changed) == 4  # 2 layers x (attention, MLP)


def test_full_training_starts_from_the_converted_weights(converted, tmp_path):
    data, init = converted
    cfg = run_config(
        data,
        init,
        tmp_path / "run",
        total_tokens=256 * 2,
        eval_every=0,
        lr=1e-9,
        min_lr=0.0,
        model={"alpha_mlp": 5e-2},
    )
    assert cfg.model_config().alpha_mlp == 5e-2 and cfg.model_config().n_mlp_experts == 4
    train(cfg)
    after = ckpt.load_model_state(ckpt.list_checkpoints(cfg.out_dir)[-1])
    start = ckpt.load_model_state(init)
    assert all(torch.allclose(after[k], start[k], atol=1e-6) for k in start)  # a tiny lr barely moves them
    assert any(not torch.equal(after[k], start[k]) for k in start if ".router." not in k)  # but all train


def test_init_from_rules_are_validated(converted, tmp_path):
    data, init = converted
    with pytest.raises(ConfigError, match="may only override"):
        run_config(data, init, tmp_path / "a", model={"d_model": 64})
    with pytest.raises(ConfigError, match="not a dsmoe checkpoint"):
        run_config(data, tmp_path / "missing", tmp_path / "b")
    with pytest.raises(ConfigError, match="trainable must be"):
        run_config(data, init, tmp_path / "c", trainable="experts")
    with pytest.raises(ConfigError, match="no routers"):
        tiny_train_config(data, tmp_path / "d", regime="dense", trainable="routers")
    cfg = load_train_config(None, [f"init_from={init}", f"data={data}", "trainable=routers", "seq_len=32"])
    assert cfg.model == {} and cfg.model_config().n_att_experts == 2


# The other corpus is small and has fewer ids than the model: both warned about, neither the point here.
@pytest.mark.filterwarnings(
    "ignore:only .* fell into the val split", "ignore:shards in .* fewer than the model's"
)
def test_data_from_another_tokenizer_is_refused(converted, tmp_path):
    _, init = converted
    other = prepared_data(tmp_path / "other", vocab_size=320, seed=3)
    with pytest.raises(ConfigError, match="another tokenizer"):
        train(run_config(other, init, tmp_path / "run", total_tokens=256, warmup_tokens=0))
