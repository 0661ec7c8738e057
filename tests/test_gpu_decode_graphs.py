"""The compiled decode step under CUDA graphs (inductor's graph trees, ``Decoder`` on a CUDA model): every step is a
replay, no graph is skipped, and the tokens equal eager decoding's, for top-k and threshold routing of attention and
MLP experts. Run by ``make gpu-check`` (marker ``gpu``)."""

import pytest
import torch
from helpers import small_config
from torch._dynamo.utils import counters

from dsmoe.inference.generate import Decoder, generate
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

SETTINGS = {
    "topk": (SparseSetting("topk", k=2), SparseSetting("topk", k=3)),
    "threshold": (SparseSetting("threshold", threshold=1.0), SparseSetting("threshold", threshold=1.2)),
}


def cuda_model(setting: str, dtype: torch.dtype) -> tuple[Transformer, SparsePlan]:
    torch.manual_seed(0)
    model = Transformer(small_config("dsmoe", d_model=64, d_expert=32)).cuda().to(dtype).eval()
    return model, SparsePlan.build(model.cfg, *SETTINGS[setting])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_graph_captured_decode_equals_eager_token_for_token(setting, dtype):
    model, plan = cuda_model(setting, dtype)
    prompt = torch.randint(0, 97, (3, 7), device="cuda")
    eager = generate(model, prompt, 20, plan=plan)
    counters.clear()
    for _ in range(2):  # the second generation's cache is new: the graph is captured again for it
        assert torch.equal(generate(model, prompt, 20, plan=plan, compile=True), eager)
    assert counters["inductor"]["cudagraph_skips"] == 0, "a decode step ran without a CUDA graph"


def test_graph_captured_steps_return_logits_that_the_next_replay_leaves_alone():
    model, plan = cuda_model("threshold", torch.float32)
    decoder = Decoder(model, 2, 12, plan=plan, compile=True)
    token = decoder.prefill(torch.randint(0, 97, (2, 4), device="cuda")).argmax(-1)
    kept = []
    for _ in range(6):
        logits = decoder.step(token)
        kept.append((logits, logits.clone()))
        token = logits.argmax(-1)
    for logits, copy in kept:
        assert torch.equal(logits, copy)
