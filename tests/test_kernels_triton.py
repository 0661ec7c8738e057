"""The Triton scatter-to-scatter kernels against the plain references: on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py when there is no GPU) at small shapes, and compiled on a GPU (marker `gpu`)."""

import os

import pytest
import torch
from kernel_cases import SETTING_IDS, SETTINGS, left_padded, make_routing, mlp_inputs, moa_inputs, tolerances

from dsmoe.kernels.cpu import SortedPairs
from dsmoe.kernels.reference import expert_mlp_reference, moa_reference
from dsmoe.kernels.triton_kernels import (
    TRITON_AVAILABLE,
    Blocks,
    block_table,
    choose_blocks,
    expert_mlp_triton,
    moa_triton,
    scatter2scatter,
)
from dsmoe.model.settings import SparseSetting

pytestmark = pytest.mark.skipif(
    not TRITON_AVAILABLE, reason="triton is not installed: pip install 'dsmoe[gpu]'"
)
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="a GPU is present, so kernels are compiled; see the gpu-marked tests",
)


def test_block_table_splits_experts_and_skips_empty_ones():
    expert_B, start_B, end_B = block_table(torch.tensor([0, 3, 3, 40], dtype=torch.int32), block_m=16)
    assert (
        len(expert_B) == 3 + 4
    )  # ceil(40 / 16) + one partial block per expert: fixed before the counts are read
    assert expert_B[:4].tolist() == [1, 3, 3, 3]
    assert start_B[:4].tolist() == [0, 3, 19, 35]
    assert end_B[:4].tolist() == [3, 40, 40, 40]
    assert torch.equal(start_B[4:], end_B[4:]), "the spare blocks must be empty"


@pytest.mark.parametrize("offs", [[0, 0, 0], [5, 5, 5], [1, 2, 3], [16, 32, 48], [0, 17, 17]])
@pytest.mark.parametrize("block_m", [16, 32])
def test_block_table_covers_every_pair_once(offs, block_m):
    expert_B, start_B, end_B = block_table(torch.tensor(offs, dtype=torch.int32), block_m)
    covered = torch.zeros(offs[-1], dtype=torch.long)
    bounds = [0, *offs]
    for e, start, end in zip(expert_B.tolist(), start_B.tolist(), end_B.tolist(), strict=True):
        stop = min(start + block_m, end)
        assert start == end or bounds[e] <= start < stop <= bounds[e + 1]
        covered[start:stop] += 1
    assert covered.tolist() == [1] * offs[-1]


@interpreted
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("n_tokens", [1, 21])
def test_expert_mlp_triton_interpreted(setting, n_tokens):
    x, w_in, w_out = mlp_inputs(n_tokens, 6, 32, 24, "gelu", torch.float32)
    routing = make_routing(n_tokens, 6, setting)
    torch.testing.assert_close(
        expert_mlp_triton(x, w_in, w_out, routing, "gelu"),
        expert_mlp_reference(x, w_in, w_out, routing, "gelu"),
        rtol=1e-4,
        atol=1e-5,
    )


@interpreted
def test_expert_mlp_triton_interpreted_odd_widths_swiglu_bf16():
    x, w_in, w_out = mlp_inputs(19, 5, 40, 20, "swiglu", torch.bfloat16)
    routing = make_routing(19, 5, SparseSetting("topk", k=2))
    torch.testing.assert_close(
        expert_mlp_triton(x, w_in, w_out, routing, "swiglu"),
        expert_mlp_reference(x, w_in, w_out, routing, "swiglu"),
        **tolerances(torch.bfloat16),
    )


@interpreted
@pytest.mark.parametrize("setting", [SETTINGS[1], SETTINGS[4]], ids=[SETTING_IDS[1], SETTING_IDS[4]])
@pytest.mark.parametrize("batch,new_tokens,cached", [(2, 1, 5), (2, 5, 0)], ids=["decode", "prefill"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
def test_moa_triton_interpreted(setting, batch, new_tokens, cached, padded):
    args = moa_inputs(batch, new_tokens, cached, 4, 2, 8, 2, 32, torch.float32)
    if padded:
        args = left_padded(args, pads=[0, 3])
    routing = make_routing(batch * new_tokens, 4, setting)
    torch.testing.assert_close(
        moa_triton(*args[:3], routing, args[3]),
        moa_reference(*args[:3], routing, args[3]),
        rtol=1e-4,
        atol=1e-5,
    )


@interpreted
def test_moa_triton_interpreted_long_prefill_after_a_cache():
    """Positions past 64 (the RoPE tables once had 64 rows: an IndexError here, a device-side assert on CUDA)."""
    x, wq, wo, ctx = moa_inputs(1, 70, 3, 2, 2, 8, 2, 16, torch.float32)
    routing = make_routing(70, 2, SparseSetting("threshold", threshold=1.0))
    torch.testing.assert_close(
        moa_triton(x, wq, wo, routing, ctx), moa_reference(x, wq, wo, routing, ctx), rtol=1e-4, atol=1e-5
    )
    assert ctx.cos_Sd.shape[0] == 73  # one row per position


@interpreted
def test_scatter2scatter_reads_rows_in_place():
    """gather=True reads token rows through the pair -> token index, without a gathered copy of x."""
    x, w_in, _ = mlp_inputs(5, 3, 16, 16, "gelu", torch.float32)
    routing = make_routing(5, 3, SparseSetting("topk", k=3))
    pairs = SortedPairs(routing)
    out = scatter2scatter(x, w_in.transpose(1, 2), pairs, gather=True)
    expected = torch.stack(
        [x[t] @ w_in[e].T for t, e in zip(pairs.token_P.tolist(), pairs.expert_P.tolist(), strict=True)]
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("blocks", [Blocks(16, 16, 16), Blocks(32, 16, 32), Blocks(64, 32, 16)], ids=str)
def test_scatter2scatter_interpreted_at_every_block_shape(blocks):
    x, w_in, _ = mlp_inputs(40, 6, 24, 40, "gelu", torch.float32)
    routing = make_routing(40, 6, SparseSetting("threshold", threshold=1.0))
    pairs = SortedPairs(routing)
    out = scatter2scatter(x, w_in.transpose(1, 2), pairs, gather=True, blocks=blocks)
    expected = torch.stack(
        [x[t] @ w_in[e].T for t, e in zip(pairs.token_P.tolist(), pairs.expert_P.tolist(), strict=True)]
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_choose_blocks_grows_row_blocks_with_rows_per_expert():
    assert choose_blocks(0.1, 1024, 88).m == 16
    assert choose_blocks(20, 1024, 88).m == 32
    assert choose_blocks(2048, 1024, 88) == Blocks(64, 64, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "blocks",
    [Blocks(16, 64, 64), Blocks(64, 64, 64), Blocks(128, 128, 64, 8, 3), Blocks(64, 128, 32, 4, 4)],
    ids=str,
)
def test_scatter2scatter_on_gpu_at_every_block_shape(blocks):
    x, w_in, _ = (t.cuda() for t in mlp_inputs(600, 32, 256, 88, "gelu", torch.bfloat16))
    routing = make_routing(600, 32, SparseSetting("threshold", threshold=1.0))
    routing = type(routing)(
        routing.indices.cuda(), routing.weights.cuda(), routing.mask.cuda(), routing.n_experts
    )
    pairs = SortedPairs(routing)
    out = scatter2scatter(x, w_in.transpose(1, 2), pairs, gather=True, blocks=blocks)
    expected = (x[pairs.token_P, None, :].float() @ w_in[pairs.expert_P].transpose(1, 2).float())[:, 0]
    torch.testing.assert_close(out.float(), expected, **tolerances(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_tokens", [1, 300])
def test_expert_mlp_and_moa_triton_on_gpu(dtype, n_tokens):
    x, w_in, w_out = (t.cuda() for t in mlp_inputs(n_tokens, 32, 256, 128, "gelu", dtype))
    routing = make_routing(n_tokens, 32, SparseSetting("topk", k=4))
    routing = type(routing)(
        routing.indices.cuda(), routing.weights.cuda(), routing.mask.cuda(), routing.n_experts
    )
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float32 else tolerances(dtype)
    torch.testing.assert_close(
        expert_mlp_triton(x, w_in, w_out, routing, "gelu"),
        expert_mlp_reference(x, w_in, w_out, routing, "gelu"),
        **tol,
    )
    x, wq, wo, ctx = moa_inputs(2, n_tokens, 3, 8, 4, 32, 4, 256, dtype)
    x, wq, wo = x.cuda(), wq.cuda(), wo.cuda()
    ctx = type(ctx)(
        *(t.cuda() for t in (ctx.k_BHSd, ctx.v_BHSd, ctx.batch_T, ctx.pos_T, ctx.cos_Sd, ctx.sin_Sd))
    )
    routing = make_routing(2 * n_tokens, 8, SparseSetting("threshold", threshold=1.0))
    routing = type(routing)(
        routing.indices.cuda(), routing.weights.cuda(), routing.mask.cuda(), routing.n_experts
    )
    torch.testing.assert_close(
        moa_triton(x, wq, wo, routing, ctx), moa_reference(x, wq, wo, routing, ctx), **tol
    )
