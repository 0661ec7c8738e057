"""DSMoEForCausalLM: parity with the native Transformer, DynamicCache decoding, padding, sparse settings."""

import pytest
import torch
from helpers import small_config
from transformers import AutoModelForCausalLM, DynamicCache

from dsmoe.config import ConfigError
from dsmoe.hf import DSMoEConfig, DSMoEForCausalLM
from dsmoe.hf.modeling import CACHE_FIELD
from dsmoe.inference.generate import generate
from dsmoe.inference.meter import ActiveMeter
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer

SPARSE = {
    "trained": ({}, None, None),
    "topk": (
        {"mlp_strategy": "topk", "mlp_k": 3, "att_strategy": "topk", "att_k": 2},
        SparseSetting("topk", k=2),
        SparseSetting("topk", k=3),
    ),
    "threshold": (
        {"mlp_strategy": "threshold", "mlp_threshold": 1.0},
        None,
        SparseSetting("threshold", threshold=1.0),
    ),
}


def pair(regime="dsmoe", **sparse):
    """A native model and an HF wrapper holding the same weights."""
    cfg = small_config(regime)
    native = Transformer(cfg).eval()
    wrapped = DSMoEForCausalLM(DSMoEConfig.from_model_config(cfg, **sparse)).eval()
    wrapped.model.load_state_dict(native.state_dict())
    return native, wrapped


@pytest.mark.parametrize("name", sorted(SPARSE))
@pytest.mark.parametrize("regime", ["dsmoe", "smoe", "dense"])
def test_wrapper_logits_equal_native_logits(regime, name):
    fields, att, mlp = SPARSE[name]
    if regime != "dsmoe" and "att_strategy" in fields:
        fields = {k: v for k, v in fields.items() if not k.startswith("att")}  # one attention expert
        att = None
    native, wrapped = pair(regime, **fields)
    plan = SparsePlan.build(native.cfg, att=att, mlp=mlp)
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(wrapped(idx).logits, native(idx, plan=plan).logits)


def test_dynamic_cache_decoding_and_greedy_generate_match_native():
    native, wrapped = pair(mlp_strategy="topk", mlp_k=2)
    plan = SparsePlan.build(native.cfg, mlp=SparseSetting("topk", k=2))
    idx = torch.randint(0, 97, (2, 9))
    cache = DynamicCache(config=wrapped.config)
    with torch.no_grad():
        steps = [wrapped(idx[:, :5], past_key_values=cache).logits[:, -1]]
        steps += [wrapped(idx[:, p : p + 1], past_key_values=cache).logits[:, -1] for p in range(5, 9)]
        for p, logits in zip(range(4, 9), steps, strict=True):
            full = native(idx[:, : p + 1], plan=plan).logits[:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 9
    prompt = idx[:, :4]
    hf = wrapped.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(hf, generate(native, prompt, 10, plan=plan))


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_cache_goes_by_either_name_and_comes_back_in_the_output(name):
    # transformers >= 5.24 passes and reads `cache`; earlier releases `past_key_values`.
    native, wrapped = pair()
    idx = torch.randint(0, 97, (2, 6))
    cache = DynamicCache(config=wrapped.config)
    with torch.no_grad():
        first = wrapped(idx[:, :5], **{name: cache})
        step = wrapped(idx[:, 5:], attention_mask=torch.ones_like(idx), **{name: cache})
        torch.testing.assert_close(step.logits[:, -1], native(idx).logits[:, -1], rtol=1e-5, atol=1e-5)
    assert first[CACHE_FIELD] is cache and cache.get_seq_length() == 6
    with pytest.raises(ValueError, match="not both"):
        wrapped(idx, cache=cache, past_key_values=cache)


def test_labels_give_the_native_losses():
    native, wrapped = pair()
    idx = torch.randint(0, 97, (2, 10))
    out = wrapped(idx, labels=idx)
    ref = native(idx, torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], 1))
    torch.testing.assert_close(out.loss, ref.loss)  # what Trainer optimises: LM plus weighted router losses
    torch.testing.assert_close(out.lm_loss, ref.lm_loss)
    torch.testing.assert_close(out.aux_loss, ref.loss - ref.lm_loss)
    assert out.aux_loss.abs() > 0


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_left_and_right_padding_give_each_sequence_its_own_logits(name):
    _, wrapped = pair(**SPARSE[name][0])
    idx = torch.randint(0, 97, (2, 8))
    right = torch.ones(2, 8, dtype=torch.long)
    right[1, 5:] = 0
    with torch.no_grad():
        alone = wrapped(idx[1:, :5]).logits[0]
        padded_right = wrapped(idx, attention_mask=right, use_cache=False).logits[1, :5]
        left_idx = torch.cat([idx[:, 5:], idx[:, :5]], dim=1)  # row 1: 3 padding tokens, then its 5 real ones
        padded_left = wrapped(left_idx, attention_mask=right.flip(-1), use_cache=False).logits[1, 3:]
    torch.testing.assert_close(padded_right, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_left, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_batched_generate_over_left_padded_prompts_equals_one_at_a_time(name):
    _, wrapped = pair(**SPARSE[name][0])
    prompts = [torch.randint(1, 97, (n,)) for n in (7, 3, 5)]
    batch = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 7 - len(prompt) :], mask[row, 7 - len(prompt) :] = prompt, 1
    together = wrapped.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        alone = wrapped.generate(prompt[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(together[row, 7:], alone[0, len(prompt) :]), f"prompt {row} differs when batched"


def test_attention_mask_must_cover_the_cache():
    _, wrapped = pair()
    cache = DynamicCache(config=wrapped.config)
    idx = torch.randint(0, 97, (1, 4))
    with torch.no_grad():
        wrapped(idx, past_key_values=cache)
        with pytest.raises(ValueError, match="must cover the cached and new tokens"):
            wrapped(idx[:, :1], attention_mask=torch.tensor([[0, 1]]), past_key_values=cache)


def test_sparse_settings_from_load_kwargs_and_per_call(tmp_path):
    _, wrapped = pair()
    wrapped.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, mlp_strategy="topk", mlp_k=4)
    assert isinstance(loaded, DSMoEForCausalLM)
    assert loaded.sparse_plan.mlp == (SparseSetting("topk", k=4),) * 2
    assert loaded.sparse_plan.att == (None, None)
    per_layer = AutoModelForCausalLM.from_pretrained(
        tmp_path, mlp_strategy=["topk", "threshold"], mlp_k=[1, None], mlp_threshold=[None, 1.5]
    )
    assert per_layer.sparse_plan.mlp == (
        SparseSetting("topk", k=1),
        SparseSetting("threshold", threshold=1.5),
    )
    meter = ActiveMeter(loaded.model.cfg)
    with loaded.sparse(meter=meter, mlp_k=1), torch.no_grad():
        loaded(torch.randint(0, 97, (1, 6)))
    assert meter.mean_active("mlp") == [1.0, 1.0]
    assert loaded.config.mlp_k == 4 and loaded.sparse_plan.setting("mlp", 0).k == 4 and loaded.meter is None
    with pytest.raises(ConfigError, match="needs an integer k in 1..8 .*got k=9"):
        loaded.set_sparse(mlp_k=9)
    assert loaded.config.mlp_k == 4  # a rejected change leaves the model as it was
    with pytest.raises(ConfigError, match="unknown sparse setting"):
        loaded.set_sparse(mlp_kk=2)


def test_config_validates_and_round_trips(tmp_path):
    cfg = DSMoEConfig.from_model_config(small_config(), mlp_strategy="topk", mlp_k=2)
    cfg.save_pretrained(tmp_path)
    again = DSMoEConfig.from_pretrained(tmp_path)
    assert again.model_config() == small_config()
    assert again.plan() == SparsePlan.build(small_config(), mlp=SparseSetting("topk", k=2))
    assert again.num_hidden_layers == 2 and again.hidden_size == 32 and again.num_attention_heads == 8
    with pytest.raises(ConfigError, match="mlp_k has 3 entries for a model with 2 layers"):
        DSMoEConfig.from_model_config(small_config(), mlp_strategy="topk", mlp_k=[1, 2, 3])
    with pytest.raises(ConfigError, match="d_model must be a positive integer"):
        DSMoEConfig(d_model=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's
@pytest.mark.parametrize("name", ["topk", "threshold"])
def test_compiled_generate_gives_generates_tokens(name):
    """DSMoEForCausalLM.compiled_generate (dsmoe's compiled decode step) gives transformers' greedy generate's
    tokens, for left-padded prompts of different lengths too."""
    _, wrapped = pair(**SPARSE[name][0])
    wrapped.config.eos_token_id = None  # random weights: let every row run to max_new_tokens in both
    prompt = torch.randint(1, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :3] = 0
    prompt[1, :3] = 0
    hf = wrapped.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(wrapped.compiled_generate(prompt, 8, attention_mask=mask), hf)


def test_generate_past_the_models_length_is_refused_before_any_work(monkeypatch):
    _, wrapped = pair()  # max_seq_len 64
    prompt = torch.randint(0, 97, (1, 10))
    monkeypatch.setattr(wrapped, "forward", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(
        ConfigError, match="at most 64 tokens, but the prompt has 10 and generation would reach 74"
    ):
        wrapped.generate(prompt, max_new_tokens=64, do_sample=False, pad_token_id=0)
    with pytest.raises(ConfigError, match="would reach 100"):
        wrapped.generate(input_ids=prompt, max_length=100, do_sample=False, pad_token_id=0)
