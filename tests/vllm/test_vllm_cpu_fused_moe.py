"""vLLM's CPU fused MoE in the vLLM model (``dsmoe.hf.vllm_model.expert_kernel``): where it is chosen, and that sparse
SwiGLU experts through it equal dsmoe's reference, fp32 and bf16, at one token and at many."""

from __future__ import annotations

import pytest
import torch
from helpers import small_config
from kernel_cases import make_routing

from dsmoe.kernels.reference import expert_mlp_reference
from dsmoe.model.experts import MLPExperts
from dsmoe.model.settings import SparseSetting

pytestmark = pytest.mark.vllm


def test_the_cpu_fused_moe_is_chosen_for_aligned_swiglu_experts_under_top_k():
    from dsmoe.hf.vllm_model import expert_kernel

    aligned = small_config(d_model=64, d_expert=32, activation="swiglu")
    assert expert_kernel(aligned, "topk") == "cpu-fused"
    # a threshold's variable count: dsmoe's kernels, which skip the dropped pairs
    assert expert_kernel(aligned, "threshold") == "dsmoe"
    assert expert_kernel(aligned, "dense") == "dense"
    assert expert_kernel(small_config(d_model=64, d_expert=16, activation="swiglu"), "topk") == "dsmoe"
    assert expert_kernel(small_config(d_model=64, d_expert=32, activation="gelu"), "topk") == "dsmoe"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_tokens", [1, 5, 70])
def test_sparse_experts_through_the_cpu_fused_moe_equal_the_reference(dtype, n_tokens):
    from dsmoe.hf.vllm_model import VLLMExperts

    torch.manual_seed(0)
    experts = MLPExperts(8, 64, 32, "swiglu")
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.1)
    experts = experts.to(dtype)
    x = torch.randn(n_tokens, 64, dtype=dtype)
    routing = make_routing(n_tokens, 8, SparseSetting("topk", k=3))
    expected = expert_mlp_reference(x.float(), experts.w_in.float(), experts.w_out.float(), routing, "swiglu")
    VLLMExperts.convert(experts, "cpu-fused")
    assert experts.packed_w13 is not None and experts.w_in.numel() == 0  # the plain weights are freed
    out = experts.sparse(x, routing)
    assert out.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.float(), expected, **tol)
