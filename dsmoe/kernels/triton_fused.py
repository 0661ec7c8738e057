"""The sparse expert MLP in a few Triton kernels, in the spirit of vLLM's fused MoE and ScatterMoE (Tan et al.,
2024, arXiv 2403.08245): for CUDA GPUs, where a sparse MLP is launch-bound (24 launches on the sorted grouped_mm
path, ~64 on the scatter-to-scatter path, 6 for a dense MLP; benchmarks/gpu/README.md). ``Kernels("fused")``
selects it; **not yet measured on a GPU**, so not the CUDA default. Inference only (no backward). Tested against
``expert_mlp_reference`` on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Kernel launches per call: **4** while the (token, slot) pairs fit one chunk of the alignment (T*K <= the chunk of
``choose_chunk``: 512 pairs with 32 experts, so every decode step up to batch 128 at top-4 and up to batch 16 with
a threshold routing, whose K is N), **6** above it (prefill):

1. ``_align_kernel`` (with 2 more launches above one chunk: ``_count_kernel`` per chunk and one ``torch.cumsum``
   of its counts): the routing's T x K slots -> an expert-sorted list of pair ids in which every expert's group is
   padded to a multiple of BLOCK_M (``sorted_pair``), and the expert of each block of BLOCK_M rows (``block_expert``).
   Shapes are fixed by T, K and N alone (at most ceil(T*K / BLOCK_M) + min(N, T*K) blocks), so nothing waits for the
   device and a CUDA graph can hold it. Masked slots (threshold routing) are in no expert's group; padding rows hold
   the sentinel pair id T*K and the spare blocks past the last group the expert -1, which the products skip.
2. ``_up_kernel``: per block and column tile, the gathered token rows x[pair // K] times the block's expert's w_in,
   the activation in the epilogue (SwiGLU: gate and up tiles in the same program) -> h [padded pairs, F].
3. ``_down_kernel``: h times w_out, times the router weight (in fp32, before rounding) -> y, row t*K + k for token t's
   slot k: written in the routing's own order rather than added into [T, D] with fp32 atomics, so the result is
   deterministic, needs neither a zeroed fp32 buffer nor a cast back (one launch each), and the combine reads each
   token's K rows as one contiguous run. Rows of masked slots are never written, and never read.
4. ``_combine_kernel``: out[t] = the sum over token t's unmasked slots of y (fp32 accumulation) -> [T, D] in x's dtype.

Buffers are ``torch.empty`` (an allocation, no launch): every element that is read was written by a kernel before.
Weights in another dtype than x are cast first (one more launch per weight; never the case in a model).

Triton's constraints: ``tl.dot`` needs tiles of at least 16 x 16, which the block sizes always are; any width works
(loads are masked). Refused, with a ValueError: an activation other than 'gelu' or 'swiglu', a SwiGLU w_in whose row
count is not twice w_out's, weights whose widths do not match x, and CPU tensors without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from dsmoe.config import ACTIVATIONS
from dsmoe.kernels.triton_kernels import TRITON_AVAILABLE, Blocks, _pow2, _require_triton, choose_blocks
from dsmoe.model.routing import Routing

try:
    import triton
    import triton.language as tl
except ImportError:  # optional, as in triton_kernels.py
    triton = None

# The alignment's one-hot tile is [chunk, experts]: about this many elements, so that it stays in registers.
ALIGN_TILE_ELEMENTS = 16384
ALIGN_WARPS = 8  # 64 of the tile's elements per thread
MAX_CHUNK = 1024
COMBINE_BLOCK_T = 16
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it when a kernel is defined, as here


class AlignedPairs(NamedTuple):
    """The routing's pairs sorted by expert in groups padded to ``block_m`` rows (see the module docstring)."""

    sorted_pair: torch.Tensor  # [n_blocks * block_m] int32: pair id t*K + k, or the sentinel T*K (padding)
    block_expert: torch.Tensor  # [n_blocks] int32: the expert of each block, -1 past the last group
    block_m: int


if TRITON_AVAILABLE:

    @triton.jit
    def _expert_of_slots(
        indices_ptr,
        mask_ptr,
        pairs,
        n_pairs,
        k_slots,
        stride_it,
        stride_ik,
        stride_mt,
        stride_mk,
        HAS_MASK: tl.constexpr,
    ):
        """The expert of each pair id in ``pairs``, -1 where the slot is masked or past the last pair."""
        ok = pairs < n_pairs
        token, slot = pairs // k_slots, pairs % k_slots
        expert = tl.load(indices_ptr + token * stride_it + slot * stride_ik, mask=ok, other=-1).to(tl.int32)
        if HAS_MASK:
            keep = tl.load(mask_ptr + token * stride_mt + slot * stride_mk, mask=ok, other=0) != 0
            expert = tl.where(keep, expert, -1)
        return expert

    @triton.jit
    def _one_hot(expert, N_PAD: tl.constexpr):
        """[len(expert), N_PAD] int32: 1 in the expert's column (no 1 for -1)."""
        return (expert[:, None] == tl.arange(0, N_PAD)[None, :]).to(tl.int32)

    @triton.jit
    def _count_kernel(
        indices_ptr, mask_ptr, counts_ptr, n_pairs, k_slots, stride_it, stride_ik, stride_mt, stride_mk,
        HAS_MASK: tl.constexpr, N_PAD: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        """counts[c, e]: pairs of chunk c routed to expert e."""
        chunk = tl.program_id(0)
        pairs = chunk * CHUNK + tl.arange(0, CHUNK)
        expert = _expert_of_slots(
            indices_ptr,
            mask_ptr,
            pairs,
            n_pairs,
            k_slots,
            stride_it,
            stride_ik,
            stride_mt,
            stride_mk,
            HAS_MASK,
        )
        tl.store(counts_ptr + chunk * N_PAD + tl.arange(0, N_PAD), tl.sum(_one_hot(expert, N_PAD), axis=0))

    @triton.jit
    def _align_kernel(
        indices_ptr, mask_ptr, cum_counts_ptr, sorted_pair_ptr, block_expert_ptr,
        n_pairs, k_slots, n_chunks, padded_len, n_blocks, stride_it, stride_ik, stride_mt, stride_mk,
        HAS_MASK: tl.constexpr, ONE_CHUNK: tl.constexpr, N_PAD: tl.constexpr, CHUNK: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """Program c places chunk c's pairs, marks padding among positions [c*CHUNK, (c+1)*CHUNK) and gives
        blocks [c*CHUNK/BLOCK_M, (c+1)*CHUNK/BLOCK_M) their expert. Pairs keep their order within an expert."""
        chunk = tl.program_id(0)
        experts = tl.arange(0, N_PAD)
        pairs = chunk * CHUNK + tl.arange(0, CHUNK)
        expert = _expert_of_slots(
            indices_ptr,
            mask_ptr,
            pairs,
            n_pairs,
            k_slots,
            stride_it,
            stride_ik,
            stride_mt,
            stride_mk,
            HAS_MASK,
        )
        one_hot = _one_hot(expert, N_PAD)
        if ONE_CHUNK:  # every pair is in chunk 0: each program counts them (programs past 0 place none)
            first = _expert_of_slots(
                indices_ptr, mask_ptr, tl.arange(0, CHUNK), n_pairs, k_slots, stride_it, stride_ik, stride_mt,
                stride_mk, HAS_MASK,
            )  # fmt: skip
            total = tl.sum(_one_hot(first, N_PAD), axis=0)
            before = tl.zeros((N_PAD,), dtype=tl.int32)
        else:  # cum_counts[c, e]: pairs of chunks 0..c routed to e
            total = tl.load(cum_counts_ptr + (n_chunks - 1) * N_PAD + experts).to(tl.int32)
            previous = tl.minimum(chunk, n_chunks) - 1
            before = tl.load(cum_counts_ptr + tl.maximum(previous, 0) * N_PAD + experts).to(tl.int32)
            before = tl.where(previous >= 0, before, 0)
        padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        group_end = tl.cumsum(padded, axis=0)
        group_start = group_end - padded

        # each pair's place: its group's start, the pairs of earlier chunks in it, and its rank within this chunk
        rank = tl.sum((tl.cumsum(one_hot, axis=0) - one_hot) * one_hot, axis=1)
        place = tl.sum((group_start + before)[None, :] * one_hot, axis=1) + rank
        tl.store(sorted_pair_ptr + place, pairs, mask=expert >= 0)

        # padding: the positions past each group's pairs (the pairs' own positions are written above, never here)
        spots = chunk * CHUNK + tl.arange(0, CHUNK)
        group = tl.sum((group_end[None, :] <= spots[:, None]).to(tl.int32), axis=1)  # N_PAD: past every group
        filled_end = tl.sum(
            tl.where(experts[None, :] == group[:, None], (group_start + total)[None, :], 0), axis=1
        )
        tl.store(sorted_pair_ptr + spots, n_pairs, mask=(spots >= filled_end) & (spots < padded_len))

        blocks = chunk * (CHUNK // BLOCK_M) + tl.arange(0, CHUNK // BLOCK_M)
        first_row = blocks * BLOCK_M
        block_group = tl.sum((group_end[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        used = first_row < tl.sum(padded, axis=0)
        tl.store(block_expert_ptr + blocks, tl.where(used, block_group, -1), mask=blocks < n_blocks)

    @triton.jit
    def _gelu(h):
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))  # exact (erf) GeLU, as F.gelu

    @triton.jit
    def _block_rows(sorted_pair_ptr, block_expert_ptr, n_pairs, BLOCK_M: tl.constexpr):
        """(expert, pair ids, which rows are real pairs) of this program's block; expert -1: a spare block."""
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ptr + rows)
        return expert, rows, pair, pair < n_pairs

    @triton.jit
    def _tile_dot(acc, a, w, FP32_DOT: tl.constexpr):
        """acc + a @ w, accumulated in fp32."""
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc=acc)
        return acc

    @triton.jit
    def _up_kernel(
        x_ptr, w_ptr, h_ptr, sorted_pair_ptr, block_expert_ptr, n_pairs, k_slots, d_model, width,
        stride_xt, stride_xd, stride_we, stride_wf, stride_wd, stride_hp, stride_hf,
        SWIGLU: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """h[row] = act(x[token] W_in[e]^T) for the block's rows, one BLOCK_N tile of the F hidden units."""
        expert, rows, pair, real = _block_rows(sorted_pair_ptr, block_expert_ptr, n_pairs, BLOCK_M)
        if expert < 0:
            return
        token = (pair // k_slots).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < width
        w_expert = w_ptr + expert.to(tl.int64) * stride_we
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d_model, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < d_model
            a = tl.load(
                x_ptr + token[:, None] * stride_xt + ks[None, :] * stride_xd,
                mask=real[:, None] & k_ok[None, :],
                other=0.0,
            )
            # W_in[e]^T's tile [BLOCK_K, BLOCK_N], read from W_in[e]'s rows
            w_tile = w_expert + cols[None, :] * stride_wf + ks[:, None] * stride_wd
            w_ok = k_ok[:, None] & col_ok[None, :]
            gate = _tile_dot(gate, a, tl.load(w_tile, mask=w_ok, other=0.0), FP32_DOT)
            if SWIGLU:  # the up projection's rows follow the gate's F rows
                up = _tile_dot(up, a, tl.load(w_tile + width * stride_wf, mask=w_ok, other=0.0), FP32_DOT)
        h = gate * tl.sigmoid(gate) * up if SWIGLU else _gelu(gate)  # SwiGLU: silu(gate) * up
        tl.store(
            h_ptr + rows[:, None].to(tl.int64) * stride_hp + cols[None, :] * stride_hf,
            h.to(h_ptr.dtype.element_ty),
            mask=real[:, None] & col_ok[None, :],
        )

    @triton.jit
    def _down_kernel(
        h_ptr, w_ptr, weights_ptr, y_ptr, sorted_pair_ptr, block_expert_ptr, n_pairs, k_slots, width, d_model,
        stride_hp, stride_hf, stride_we, stride_wf, stride_wd, stride_rt, stride_rk, stride_yp, stride_yd,
        FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """y[pair] = router weight x h[row] W_out[e], for the block's rows, one BLOCK_N tile of D."""
        expert, rows, pair, real = _block_rows(sorted_pair_ptr, block_expert_ptr, n_pairs, BLOCK_M)
        if expert < 0:
            return
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < d_model
        w_expert = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, width, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < width
            a = tl.load(
                h_ptr + rows[:, None].to(tl.int64) * stride_hp + ks[None, :] * stride_hf,
                mask=real[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_expert + ks[:, None] * stride_wf + cols[None, :] * stride_wd,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = _tile_dot(acc, a, w, FP32_DOT)
        token, slot = pair // k_slots, pair % k_slots
        router = tl.load(weights_ptr + token * stride_rt + slot * stride_rk, mask=real, other=0.0)
        acc = acc * router.to(tl.float32)[:, None]
        tl.store(
            y_ptr + pair[:, None].to(tl.int64) * stride_yp + cols[None, :] * stride_yd,
            acc.to(y_ptr.dtype.element_ty),
            mask=real[:, None] & col_ok[None, :],
        )

    @triton.jit
    def _combine_kernel(
        y_ptr, mask_ptr, out_ptr, n_tokens, k_slots, d_model, stride_yp, stride_yd, stride_mt, stride_mk,
        stride_ot, stride_od, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """out[t] = the sum of y over token t's unmasked slots (rows t*K .. t*K + K - 1)."""
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        token_ok = tokens < n_tokens
        col_ok = cols < d_model
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for slot in range(0, k_slots):
            keep = token_ok
            if HAS_MASK:
                keep = keep & (
                    tl.load(mask_ptr + tokens * stride_mt + slot * stride_mk, mask=token_ok, other=0) != 0
                )
            rows = (tokens * k_slots + slot).to(tl.int64)
            y = tl.load(
                y_ptr + rows[:, None] * stride_yp + cols[None, :] * stride_yd,
                mask=keep[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += y.to(tl.float32)
        tl.store(
            out_ptr + tokens[:, None].to(tl.int64) * stride_ot + cols[None, :] * stride_od,
            acc.to(out_ptr.dtype.element_ty),
            mask=token_ok[:, None] & col_ok[None, :],
        )


def choose_chunk(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Pairs per program of the alignment: the one-hot tile [chunk, experts] near ALIGN_TILE_ELEMENTS, no more than
    the pairs need, and at least one block of rows (a program also labels chunk / block_m blocks)."""
    tile_rows = max(16, min(MAX_CHUNK, _pow2(ALIGN_TILE_ELEMENTS // _pow2(n_experts))))
    return max(block_m, min(tile_rows, _pow2(n_pairs)))


def n_blocks_needed(n_pairs: int, n_experts: int, block_m: int) -> int:
    """The most blocks any routing of ``n_pairs`` pairs over ``n_experts`` can need: each expert's group rounded up
    to a whole block adds at most one block per non-empty group."""
    return -(-n_pairs // block_m) + min(n_experts, n_pairs)


def _mask_arg(routing: Routing) -> tuple[torch.Tensor, bool]:
    """The mask as bytes (a view, no copy) and whether the kernels must read it."""
    return routing.mask.view(torch.uint8), not routing.all_valid


def align_pairs(routing: Routing, block_m: int, chunk: int | None = None) -> AlignedPairs:
    """The routing's unmasked pairs sorted by expert in groups padded to ``block_m`` rows, without a host sync:
    1 launch while T*K <= ``chunk`` (default ``choose_chunk``), else 3 (per-chunk counts, their running sum, the
    placement)."""
    _require_triton()
    indices, n_experts = routing.indices, routing.n_experts
    n_pairs = indices.numel()
    n_pad = _pow2(n_experts)
    chunk = chunk or choose_chunk(n_pairs, n_experts, block_m)
    if chunk % block_m or chunk & (chunk - 1):
        raise ValueError(
            f"the alignment chunk must be a power of two and a multiple of {block_m} (got {chunk})"
        )
    n_chunks = -(-n_pairs // chunk)
    n_blocks = n_blocks_needed(n_pairs, n_experts, block_m)
    padded_len = n_blocks * block_m
    device = indices.device
    sorted_pair = torch.empty(padded_len, dtype=torch.int32, device=device)
    block_expert = torch.empty(n_blocks, dtype=torch.int32, device=device)
    mask, has_mask = _mask_arg(routing)
    strides = (*indices.stride(), *mask.stride())
    cum_counts = sorted_pair  # unread when every pair is in one chunk
    if n_chunks > 1:
        counts = torch.empty(n_chunks, n_pad, dtype=torch.int32, device=device)
        _count_kernel[(n_chunks,)](
            indices, mask, counts, n_pairs, indices.shape[1], *strides,
            HAS_MASK=has_mask, N_PAD=n_pad, CHUNK=chunk, num_warps=ALIGN_WARPS,
        )  # fmt: skip
        cum_counts = counts.cumsum(0, dtype=torch.int32)
    _align_kernel[(-(-padded_len // chunk),)](
        indices, mask, cum_counts, sorted_pair, block_expert,
        n_pairs, indices.shape[1], n_chunks, padded_len, n_blocks, *strides,
        HAS_MASK=has_mask, ONE_CHUNK=n_chunks == 1, N_PAD=n_pad, CHUNK=chunk, BLOCK_M=block_m,
        num_warps=ALIGN_WARPS,
    )  # fmt: skip
    return AlignedPairs(sorted_pair, block_expert, block_m)


def _check_inputs(
    x_TD: torch.Tensor, w_in_NFD: torch.Tensor, w_out_NFD: torch.Tensor, activation: str
) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"the fused expert MLP computes {' or '.join(ACTIVATIONS)}, not {activation!r}")
    width_in = 2 * w_out_NFD.shape[1] if activation == "swiglu" else w_out_NFD.shape[1]
    if w_in_NFD.shape[1] != width_in:
        raise ValueError(
            f"{activation}: w_in needs {width_in} rows per expert for w_out's {w_out_NFD.shape[1]} "
            f"(got {w_in_NFD.shape[1]})"
        )
    if not (x_TD.shape[1] == w_in_NFD.shape[2] == w_out_NFD.shape[2]):
        raise ValueError(
            f"x's width {x_TD.shape[1]} must be w_in's and w_out's ({w_in_NFD.shape[2]}, {w_out_NFD.shape[2]})"
        )
    if x_TD.device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "the fused Triton kernels run on CPU tensors only through Triton's interpreter: set TRITON_INTERPRET=1 "
            "before dsmoe is imported (tests do), or use a CUDA device"
        )


class FusedBlocks(NamedTuple):
    """Launch shapes: the row block of both products, their column tiles and depths."""

    m: int
    up: Blocks
    down: Blocks


def choose_fused_blocks(rows_per_expert: float, d_model: int, width: int) -> FusedBlocks:
    """The scatter-to-scatter kernel's choice (``choose_blocks``) for each product, with one row block for both."""
    up = choose_blocks(rows_per_expert, d_model, width)
    down = choose_blocks(rows_per_expert, width, d_model)
    return FusedBlocks(up.m, up, down)


def expert_mlp_fused(
    x_TD: torch.Tensor, w_in_NFD: torch.Tensor, w_out_NFD: torch.Tensor, routing: Routing, activation: str
) -> torch.Tensor:
    """Expert MLP in 4 kernel launches (6 above one alignment chunk of pairs; see the module docstring); same
    contract as ``expert_mlp_reference``. Not yet measured on a GPU."""
    _require_triton()
    _check_inputs(x_TD, w_in_NFD, w_out_NFD, activation)
    n_tokens, d_model = x_TD.shape
    k_slots, width = routing.indices.shape[1], w_out_NFD.shape[1]
    n_pairs = n_tokens * k_slots
    if n_pairs == 0:
        return torch.zeros_like(x_TD)
    blocks = choose_fused_blocks(n_pairs / routing.n_experts, d_model, width)
    aligned = align_pairs(routing, blocks.m)
    w_in, w_out = w_in_NFD.to(x_TD.dtype), w_out_NFD.to(x_TD.dtype)
    # CPU tensors run in Triton's interpreter, whose tl.dot of bf16 tiles is wrong (3.9): fp32 tiles there
    fp32_dot = x_TD.dtype == torch.float32 or x_TD.device.type == "cpu"
    h = _up_projection(x_TD, w_in, aligned, n_pairs, k_slots, width, activation, blocks.up, fp32_dot)
    y = _down_projection(h, w_out, routing.weights, aligned, n_pairs, k_slots, blocks.down, fp32_dot)
    return _combine_slots(y, routing, n_tokens)


def _up_projection(
    x, w_in, aligned: AlignedPairs, n_pairs, k_slots, width, activation, blocks: Blocks, fp32_dot
):
    """h [padded pairs, F]: the activation of each sorted row's input projection (padding rows unwritten)."""
    h = x.new_empty(aligned.sorted_pair.shape[0], width)
    grid = (aligned.block_expert.shape[0], triton.cdiv(width, blocks.n))
    _up_kernel[grid](
        x, w_in, h, aligned.sorted_pair, aligned.block_expert, n_pairs, k_slots, x.shape[1], width,
        *x.stride(), *w_in.stride(), *h.stride(),
        SWIGLU=activation == "swiglu", FP32_DOT=fp32_dot, BLOCK_M=aligned.block_m, BLOCK_N=blocks.n,
        BLOCK_K=blocks.k, num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    return h


def _down_projection(h, w_out, weights, aligned: AlignedPairs, n_pairs, k_slots, blocks: Blocks, fp32_dot):
    """y [T*K, D]: row t*K + k, token t's slot k, its weighted output (masked slots' rows unwritten)."""
    d_model = w_out.shape[2]
    y = h.new_empty(n_pairs, d_model)
    grid = (aligned.block_expert.shape[0], triton.cdiv(d_model, blocks.n))
    _down_kernel[grid](
        h, w_out, weights, y, aligned.sorted_pair, aligned.block_expert, n_pairs, k_slots, w_out.shape[1], d_model,
        *h.stride(), *w_out.stride(), *weights.stride(), *y.stride(),
        FP32_DOT=fp32_dot, BLOCK_M=aligned.block_m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    return y


def _combine_slots(y: torch.Tensor, routing: Routing, n_tokens: int) -> torch.Tensor:
    """[T, D]: each token's unmasked slots' rows of y added up."""
    d_model = y.shape[1]
    out = y.new_empty(n_tokens, d_model)
    mask, has_mask = _mask_arg(routing)
    block_d = min(128, _pow2(d_model))
    grid = (triton.cdiv(n_tokens, COMBINE_BLOCK_T), triton.cdiv(d_model, block_d))
    _combine_kernel[grid](
        y, mask, out, n_tokens, routing.indices.shape[1], d_model, *y.stride(), *mask.stride(), *out.stride(),
        HAS_MASK=has_mask, BLOCK_T=COMBINE_BLOCK_T, BLOCK_D=block_d,
    )  # fmt: skip
    return out
