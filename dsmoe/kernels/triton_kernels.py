"""A Triton scatter-to-scatter grouped matrix product, in the spirit of ScatterMoE's ParallelLinear (Tan et al., 2024,
arXiv 2403.08245). Not the default on GPUs: sorted dispatch with torch's grouped_mm is 1.7-1.9x faster end to end on
an H200 (benchmarks/gpu/README.md); ``DSMOE_KERNELS=triton`` selects it.

Pairs are sorted by expert and cut into blocks of BLOCK_M rows that never straddle two experts. One program
multiplies one block by one BLOCK_N-wide column tile of its expert's weight. Its input rows are read straight from
wherever they live (token rows of x, through the pair -> token index: no gathered copy of x is made) and its
output rows are written straight to where they belong, optionally scaled by the router weight.

Used for the MLP experts and for the MoA query/output projections; the rest of the sparse computation (activation,
attention, combining pairs into tokens) is shared with the CPU path in ``cpu.py``. Tested on the CPU with Triton's
interpreter (``TRITON_INTERPRET=1``) at small shapes, and on a GPU when one is available.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dsmoe.kernels.cpu import SortedPairs, expert_mlp_sorted, moa_sorted
from dsmoe.kernels.reference import AttentionContext
from dsmoe.model.routing import Routing

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: `pip install dsmoe[gpu]`
    triton = None

TRITON_AVAILABLE = triton is not None
BLOCK_M = 16  # the fewest rows of one block; tl.dot needs >= 16


class Blocks(NamedTuple):
    """One launch configuration: a program multiplies m sorted pairs by an n-wide column tile, k at a time."""

    m: int
    n: int
    k: int
    warps: int = 4
    stages: int = 3


def choose_blocks(rows_per_expert: float, k_dim: int, m_dim: int) -> Blocks:
    """Row blocks as tall as the experts' average row count allows (16 to 64): short blocks at decode waste no
    rows, tall ones at prefill reuse each weight tile over more rows."""
    m = min(64, max(BLOCK_M, _pow2(int(rows_per_expert))))
    return Blocks(m, min(64, max(16, _pow2(m_dim))), min(64, max(16, _pow2(k_dim))))


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


if TRITON_AVAILABLE:

    @triton.jit
    def _scatter2scatter_kernel(
        a_ptr,
        w_ptr,
        out_ptr,
        a_rows_ptr,
        block_expert_ptr,
        block_start_ptr,
        block_end_ptr,
        k_dim,
        m_dim,
        stride_am,
        stride_ak,
        stride_we,
        stride_wk,
        stride_wm,
        stride_om,
        stride_on,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FP32_DOT: tl.constexpr,
    ):
        block = tl.program_id(0)
        start = tl.load(block_start_ptr + block)
        end = tl.load(block_end_ptr + block)
        if start >= end:  # one of the table's spare blocks (see block_table)
            return
        expert = tl.load(block_expert_ptr + block)
        rows = start + tl.arange(0, BLOCK_M)  # sorted pair indices of this block
        row_ok = rows < end
        a_rows = tl.load(a_rows_ptr + rows, mask=row_ok, other=0)  # where each pair's input row lives
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < m_dim
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k_dim
            a = tl.load(
                a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wm,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if FP32_DOT:
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        tl.store(
            out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


def _require_triton() -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            "the Triton kernels need the 'triton' package: pip install 'dsmoe[gpu]' (or triton)"
        )


def block_table(
    offs_N: torch.Tensor, block_m: int = BLOCK_M, n_blocks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert, start, end) of ``n_blocks`` blocks of at most ``block_m`` sorted pairs; blocks never straddle experts
    and experts with no pairs get no block; the blocks past the last needed one are empty (start == end). Given
    ``n_blocks`` (``scatter2scatter`` passes the most any split of its pairs can need: ceil(pairs / block_m), plus
    one partial block per expert), building the table needs no host sync; without it, the pair count is read from
    offs_N."""
    n_experts = offs_N.shape[0]
    ends = offs_N.long()
    if n_blocks is None:
        n_blocks = _cdiv(int(ends[-1]), block_m) + n_experts
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    per_expert = (ends - starts + block_m - 1) // block_m
    last_block = torch.cumsum(per_expert, 0)  # one past each expert's last block
    block_B = torch.arange(n_blocks, device=ends.device)
    expert_B = torch.searchsorted(last_block, block_B, right=True).clamp_(max=n_experts - 1)
    start_B = starts[expert_B] + (block_B - (last_block - per_expert)[expert_B]) * block_m
    end_B = ends[expert_B]
    start_B = torch.where(block_B < last_block[-1], start_B, end_B)
    return expert_B, start_B, end_B


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scatter2scatter(
    a: torch.Tensor, w_NKM: torch.Tensor, pairs: SortedPairs, gather: bool, blocks: Blocks | None = None
) -> torch.Tensor:
    """[P, M]: row p is (a[token_P[p]] if gather else a[p]) times w[expert_P[p]] — same contract as
    ``cpu.project_sorted``, without materialising the gathered input. ``blocks``: the launch configuration
    (default ``choose_blocks``)."""
    _require_triton()
    n_pairs, (n_experts, k_dim, m_dim) = pairs.token_P.shape[0], w_NKM.shape
    out = a.new_empty(n_pairs, m_dim)
    if n_pairs == 0:
        return out
    blocks = blocks or choose_blocks(n_pairs / n_experts, k_dim, m_dim)
    a_rows = pairs.token_P if gather else torch.arange(n_pairs, device=a.device)
    n_blocks = _cdiv(n_pairs, blocks.m) + n_experts  # enough for any split of the pairs over the experts
    expert_B, start_B, end_B = block_table(pairs.offs_N, blocks.m, n_blocks)
    grid = (n_blocks, triton.cdiv(m_dim, blocks.n))
    w = w_NKM.to(a.dtype)
    _scatter2scatter_kernel[grid](
        a,
        w,
        out,
        a_rows,
        expert_B,
        start_B,
        end_B,
        k_dim,
        m_dim,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_M=blocks.m,
        BLOCK_N=blocks.n,
        BLOCK_K=blocks.k,
        # CPU tensors run in Triton's interpreter, whose tl.dot of bf16 tiles is wrong (3.9): fp32 tiles there
        FP32_DOT=a.dtype == torch.float32 or a.device.type == "cpu",
        num_warps=blocks.warps,
        num_stages=blocks.stages,
    )
    return out


def expert_mlp_triton(
    x_TD: torch.Tensor, w_in_NFD: torch.Tensor, w_out_NFD: torch.Tensor, routing: Routing, activation: str
) -> torch.Tensor:
    """Expert MLP through the scatter-to-scatter kernel; same contract as ``expert_mlp_reference``."""
    return expert_mlp_sorted(x_TD, w_in_NFD, w_out_NFD, routing, activation, scatter2scatter)


def moa_triton(
    x_TD: torch.Tensor, wq_NED: torch.Tensor, wo_NED: torch.Tensor, routing: Routing, ctx: AttentionContext
) -> torch.Tensor:
    """MoA with the query/output projections through the scatter-to-scatter kernel; same contract as
    ``moa_reference``."""
    return moa_sorted(x_TD, wq_NED, wo_NED, routing, ctx, scatter2scatter)
