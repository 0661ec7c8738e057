"""Whole models on a CUDA GPU against the plain reference: the sparse forward through either CUDA path (sorted
grouped products, compiled Triton kernels) gives the reference kernels' logits, the compiled decode step gives
eager decoding's tokens, and a bf16 autocast training step gives the fp32 step's gradients within bf16's precision.
Run by ``make gpu-check`` (marker ``gpu``)."""

import pytest
import torch
from helpers import small_config

from dsmoe.inference.generate import generate
from dsmoe.kernels import implementation
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import Kernels, SparseSetting
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


def cuda_model(setting: str | None, **overrides) -> tuple[Transformer, SparsePlan]:
    torch.manual_seed(0)
    model = Transformer(small_config("dsmoe", d_model=64, d_expert=32, **overrides)).cuda().eval()
    att, mlp = SETTINGS[setting] if setting else (None, None)
    return model, SparsePlan.build(model.cfg, att, mlp)


@pytest.mark.parametrize("path", ["triton", "sorted"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_forward_on_cuda_equals_the_reference(path, setting, dtype):
    """Both CUDA paths: sorted dispatch with torch's grouped products (the default) and the Triton kernels."""
    model, plan = cuda_model(setting)
    model = model.to(dtype)
    tokens = torch.randint(0, 97, (3, 40), device="cuda")
    assert implementation(Kernels(), torch.zeros(1, device="cuda")) == "sorted"
    with torch.no_grad():
        fast = model(tokens, plan=plan.with_kernels(path)).logits.float()
        reference = model(tokens, plan=plan.with_kernels("reference")).logits.float()
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}
    torch.testing.assert_close(fast, reference, **tol)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_compiled_decode_equals_eager_token_for_token_on_cuda(setting):
    model, plan = cuda_model(setting)
    prompt = torch.randint(0, 97, (2, 6), device="cuda")
    eager = generate(model, prompt, 16, plan=plan)
    assert torch.equal(generate(model, prompt, 16, plan=plan, compile=True), eager)


def test_bf16_autocast_training_step_matches_fp32_gradients():
    model = cuda_model(None)[0].train()
    tokens = torch.randint(0, 97, (4, 48), device="cuda")
    model(tokens, tokens).loss.backward()
    fp32 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(tokens, tokens).loss.backward()
    assert fp32, "no gradients"
    for name, grad in fp32.items():
        bf16 = model.get_parameter(name).grad
        cosine = torch.nn.functional.cosine_similarity(bf16.flatten().float(), grad.flatten(), dim=0)
        assert cosine > 0.99, f"{name}: bf16 gradient's cosine to fp32's is {cosine:.4f}"
