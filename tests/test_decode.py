"""The compiled decode step (``Decoder(compile=True)``) gives eager decoding's logits and tokens, for every regime
and sparse strategy, left-padded batches included, with one compiled graph for all the steps of a generation."""

import pytest
import torch
from helpers import small_config
from torch._dynamo.utils import counters

from dsmoe.inference.generate import Decoder, cache_length, generate, stream
from dsmoe.inference.sparsify import ActiveMeter, sparsify
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


def model_for(case: str) -> Transformer:
    regime, att, mlp = CASES[case]
    torch.manual_seed(0)
    return sparsify(Transformer(small_config(regime)).eval(), att=att, mlp=mlp)


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_decode_matches_eager_step_by_step_in_one_graph(case):
    model = model_for(case)
    prompt = torch.randint(0, 97, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, :2] = mask[2, :4] = False  # left padding: rows of prompt length 5, 3 and 1
    eager, compiled = Decoder(model, 3, 14), Decoder(model, 3, 14, compile=True)
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


def test_compiled_generate_and_stream_equal_eager_token_for_token():
    model = model_for("dsmoe-threshold")
    prompt = torch.randint(0, 97, (2, 6))
    assert torch.equal(generate(model, prompt, 12, compile=True), generate(model, prompt, 12))
    gen = [torch.Generator().manual_seed(3) for _ in range(2)]
    sampled = [
        generate(model, prompt, 12, temperature=0.9, top_p=0.9, generator=g, compile=c)
        for g, c in zip(gen, (False, True), strict=True)
    ]
    assert torch.equal(sampled[0], sampled[1])
    assert list(stream(model, prompt[0], 10, compile=True)) == list(stream(model, prompt[0], 10))


def test_compiled_decode_refuses_a_model_with_a_meter():
    model = Transformer(small_config()).eval()
    sparsify(model, mlp=SparseSetting("topk", k=2), meter=ActiveMeter(model.cfg))
    with pytest.raises(ValueError, match="ActiveMeter"):
        Decoder(model, 1, 8, compile=True)


def test_cache_length_rounds_up_within_the_model():
    assert [cache_length(n, 2048) for n in (1, 64, 65, 300, 2048)] == [64, 64, 128, 320, 2048]
    assert cache_length(100, 100) == 100
    with pytest.raises(ValueError, match="max_seq_len"):
        cache_length(101, 100)


@pytest.mark.parametrize("compile", [False, True])
def test_a_full_cache_is_a_clear_error(compile):
    model = model_for("dsmoe-topk")
    decoder = Decoder(model, 1, 64 if compile else 6, compile=compile)
    token = decoder.prefill(torch.randint(0, 97, (1, 4))).argmax(-1)
    decoder.pos = decoder.cache.max_len  # every slot written
    with pytest.raises(ValueError, match="KV cache is full"):
        decoder.step(token)
