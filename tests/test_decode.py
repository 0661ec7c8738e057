"""The compiled decode step (``Decoder(compile=True)``) gives eager decoding's logits and tokens, for every regime
and sparse strategy, left-padded batches included, with one compiled graph for all the steps of a generation."""

import pytest
import torch
from helpers import small_config
from torch._dynamo.utils import counters

from dsmoe.inference.generate import Decoder, cache_length, generate, stream
from dsmoe.inference.meter import ActiveMeter
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer

# inductor's own use of torch.jit.script_method warns on torch 2.13; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

CASES = {  # regime, attention setting, MLP setting
    "dsmoe-as-trained": ("dsmoe", None, None),
    "dsmoe-topk": ("dsmoe", SparseSetting("topk", k=2), SparseSetting("topk", k=3)),
    "dsmoe-threshold": (
        "dsmoe",
        SparseSetting("threshold", threshold=1.0),
        SparseSetting("threshold", threshold=1.2),
    ),
    "dsmoe-threshold_topk": ("dsmoe", None, SparseSetting("threshold_topk", threshold=1.1)),
    "smoe-as-trained": ("smoe", None, None),
    "dense": ("dense", None, None),
}


def model_for(case: str) -> tuple[Transformer, SparsePlan]:
    regime, att, mlp = CASES[case]
    torch.manual_seed(0)
    model = Transformer(small_config(regime)).eval()
    return model, SparsePlan.build(model.cfg, att, mlp)


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_decode_matches_eager_step_by_step_in_one_graph(case):
    model, plan = model_for(case)
    prompt = torch.randint(0, 97, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, :2] = mask[2, :4] = False  # left padding: rows of prompt length 5, 3 and 1
    eager, compiled = Decoder(model, 3, 14, plan=plan), Decoder(model, 3, 14, plan=plan, compile=True)
    assert compiled.cache.max_len == 64  # rounded up, so that nearby lengths share the graph
    torch._dynamo.reset()
    counters.clear()
    logits_e, logits_c = eager.prefill(prompt, mask), compiled.prefill(prompt, mask)
    torch.testing.assert_close(logits_c, logits_e)
    for _ in range(9):
        token = logits_e.argmax(-1)
        assert torch.equal(logits_c.argmax(-1), token)
        logits_e, logits_c = eager.step(token), compiled.step(token)
        torch.testing.assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, "the decode step recompiled between steps"
    # the keys and values the compiled steps wrote equal eager's, slot for slot
    for compiled_kv, eager_kv in zip(
        compiled.cache.k + compiled.cache.v, eager.cache.k + eager.cache.v, strict=True
    ):
        torch.testing.assert_close(compiled_kv[:, :, :14], eager_kv, rtol=1e-4, atol=1e-5)


def test_compiled_batch_one_top_k_decode_gathers_experts_and_equals_eager(monkeypatch):
    """At batch 1 a top-k step has no more (token, expert) pairs than experts, so the compiled step traces the
    gathered paths of both the MLP and attention experts (dsmoe.kernels); its tokens are eager's."""
    from dsmoe import kernels

    torch._dynamo.reset()  # trace afresh: a step compiled by an earlier test would not call the patched functions
    traced = []
    for name in ("expert_mlp_gathered", "moa_gathered"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name: traced.append(_n) or _f(*a))
    model, plan = model_for("dsmoe-topk")
    prompt = torch.randint(0, 97, (1, 6))
    assert torch.equal(
        generate(model, prompt, 12, plan=plan, compile=True), generate(model, prompt, 12, plan=plan)
    )
    assert {"expert_mlp_gathered", "moa_gathered"} <= set(traced)


def test_compiled_generate_and_stream_equal_eager_token_for_token():
    model, plan = model_for("dsmoe-threshold")
    prompt = torch.randint(0, 97, (2, 6))
    compiled = generate(model, prompt, 12, plan=plan, compile=True)
    assert torch.equal(compiled, generate(model, prompt, 12, plan=plan))
    assert not torch.equal(compiled, generate(model, prompt, 12))  # the plan is what ran
    gen = [torch.Generator().manual_seed(3) for _ in range(2)]
    sampled = [
        generate(model, prompt, 12, temperature=0.9, top_p=0.9, generator=g, plan=plan, compile=c)
        for g, c in zip(gen, (False, True), strict=True)
    ]
    assert torch.equal(sampled[0], sampled[1])
    streamed = list(stream(model, prompt[0], 10, plan=plan, compile=True))
    assert streamed == list(stream(model, prompt[0], 10, plan=plan))


@pytest.mark.parametrize("case", ["dsmoe-threshold", "dsmoe-threshold_topk", "smoe-as-trained"])
def test_compiled_decode_is_metered_as_eager_decode_is(case):
    """The compiled step returns each token's expert counts: the meter sees what it sees eager."""
    model, plan = model_for(case)
    prompt = torch.randint(0, 97, (2, 6))
    meters = {compile: ActiveMeter(model.cfg) for compile in (False, True)}
    for compile, meter in meters.items():
        generate(model, prompt, 10, plan=plan, compile=compile, meter=meter)
    eager, compiled = meters[False], meters[True]
    assert compiled.tokens == eager.tokens and compiled.active == eager.active
    assert compiled.min == eager.min and compiled.max == eager.max
    assert eager.tokens["mlp"] == [2 * 6 + 2 * 9] * model.cfg.n_layers  # the prompt, then 9 decode steps


def test_cache_length_rounds_up_within_the_model():
    assert [cache_length(n, 2048) for n in (1, 64, 65, 300, 2048)] == [64, 64, 128, 320, 2048]
    assert cache_length(100, 100) == 100
    with pytest.raises(ValueError, match="max_seq_len"):
        cache_length(101, 100)


@pytest.mark.parametrize("compile", [False, True])
def test_a_full_cache_is_a_clear_error(compile):
    model, plan = model_for("dsmoe-topk")
    decoder = Decoder(model, 1, 64 if compile else 6, plan=plan, compile=compile)
    token = decoder.prefill(torch.randint(0, 97, (1, 4))).argmax(-1)
    decoder.pos = decoder.cache.max_len  # every slot written
    with pytest.raises(ValueError, match="KV cache is full"):
        decoder.step(token)
