"""CPU fast paths for sparse experts, chosen by the number of tokens; same signatures as ``reference.py`` and
tested against it.

* batch-1 decode (MLP): two matrix-vector products per selected expert, its weights read in place: only K/N of the
  weights are read, each once;
* small batches (decode at batch > 1, short prefill): tokens sorted by expert, each expert's rows one contiguous
  group, and one grouped product per projection (``torch.nn.functional.grouped_mm``), with no Python loop over
  experts; experts without tokens are empty groups whose weights are never touched;
* long prefill (MLP): one expert at a time over the sorted pairs, so that each expert's rows stay in cache between
  its two products (see LOOP_PAIRS_PER_EXPERT); from two tokens up wherever oneDNN multiplies the expert weights
  (``dsmoe.kernels.onednn``: large fp32 weights), whose products beat the grouped ones;
* decode in a compiled graph (top-k): ``expert_mlp_gathered``, reductions that inductor fuses with the gather.

The grouped products are a custom op with their own backward, so the sorted path also trains (SMoE) and compiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsmoe.kernels.onednn import OP_NAMESPACE, fast_linear, onednn_suits, packed_linear
from dsmoe.kernels.reference import AttentionContext, activate, moa_reference
from dsmoe.model.rope import apply_rope
from dsmoe.model.routing import Routing


class SortedPairs:
    """The valid (token, expert, weight) pairs of a Routing, sorted by expert, with group end offsets [N] (int32)."""

    __slots__ = ("token_P", "expert_P", "weight_P", "offs_N")

    def __init__(self, routing: Routing):
        n = routing.n_experts
        # Dropped pairs get the sentinel expert n: the stable sort puts them last and slicing removes them, so
        # fixed-K and threshold routings share this one path.
        expert_flat = routing.indices.masked_fill(~routing.mask, n).flatten()
        order = torch.argsort(expert_flat, stable=True)
        # scatter_add rather than bincount: its output shape is known before it runs, so this compiles
        ones = torch.ones_like(expert_flat)
        counts = torch.zeros(n + 1, dtype=expert_flat.dtype, device=ones.device).scatter_add_(
            0, expert_flat, ones
        )
        self.offs_N = counts[:n].cumsum(0).to(torch.int32)
        if (
            not routing.all_valid
        ):  # how many pairs are valid depends on the data: the one graph break, if compiled
            order = order[: int(self.offs_N[-1])]
        self.token_P = torch.div(order, routing.indices.shape[1], rounding_mode="floor")
        self.expert_P = expert_flat[order]
        self.weight_P = routing.weights.flatten()[order]


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs every stride of its operands to be a multiple of 16 bytes."""
    size = t.element_size()
    return all(s * size % 16 == 0 for s, d in zip(t.stride(), t.shape, strict=True) if d > 1 and s != 1)


# bf16 products on AVX2-only CPUs (no AVX512-BF16/AMX) run several times slower than fp32 once they are compute
# bound. With at least this many rows per expert on average (prefill), upcasting the weights and multiplying in fp32
# is faster (measured 4-6x at 512 tokens, D=1024, 32 experts); at decode the native bf16 product, which reads half
# the bytes, is faster. See benchmarks/throughput.md. CPUs with AVX512-BF16 or AMX multiply bf16 natively, faster
# than fp32, and never upcast: at 2,048 tokens the sorted bf16 path takes 14.3 ms native against 41.7 ms upcast on
# a Xeon with AMX (benchmarks/bf16_expert_paths.py; benchmarks/throughput.md, the AMX section).
BF16_UPCAST_ROWS_PER_EXPERT = 8


def _native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); torch's own checks, where it has them."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


NATIVE_BF16 = _native_bf16()


def upcast_bf16(a: torch.Tensor, rows_per_expert: float) -> bool:
    """Whether a CPU bf16 product with this many rows per expert is faster in fp32 (see BF16_UPCAST_ROWS_PER_EXPERT)."""
    return (
        a.device.type == "cpu"
        and a.dtype == torch.bfloat16
        and not NATIVE_BF16
        and rows_per_expert >= BF16_UPCAST_ROWS_PER_EXPERT
    )


def grouped_mm(a_PK: torch.Tensor, b_NKM: torch.Tensor, offs_N: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of ``a`` times ``b[e]``, for all experts e at once -> [P, M].

    Uses torch's grouped_mm when the strides allow it; otherwise (odd widths, never the case for real model shapes)
    a loop over the non-empty groups gives the same result. bf16 on a CPU without native bf16 products, with many
    rows per expert, is computed in fp32 (see ``upcast_bf16``) and returned in bf16."""
    if upcast_bf16(a_PK, a_PK.shape[0] / b_NKM.shape[0]):
        return _grouped_mm(a_PK.float(), b_NKM.float(), offs_N).to(torch.bfloat16)
    return _grouped_mm(a_PK, b_NKM, offs_N)


@torch.library.custom_op(f"{OP_NAMESPACE}::grouped_mm", mutates_args=())
def _grouped_mm(a_PK: torch.Tensor, b_NKM: torch.Tensor, offs_N: torch.Tensor) -> torch.Tensor:
    """grouped_mm as a custom op with its own backward: torch's meta function for ``_grouped_mm`` accepts only
    bf16, so without the op a compiled fp32 SMoE training step could not trace the grouped products at all."""
    if a_PK.dtype == b_NKM.dtype and _aligned(a_PK.contiguous()) and _aligned(b_NKM):
        return F.grouped_mm(a_PK.contiguous(), b_NKM, offs=offs_N)
    out = a_PK.new_empty(a_PK.shape[0], b_NKM.shape[2])
    start = 0
    for e, end in enumerate(offs_N.tolist()):
        if end > start:
            out[start:end] = a_PK[start:end] @ b_NKM[e].to(a_PK.dtype)
        start = end
    return out


@_grouped_mm.register_fake
def _grouped_mm_fake(a_PK, b_NKM, offs_N):
    return a_PK.new_empty(a_PK.shape[0], b_NKM.shape[2])


@torch.library.custom_op(f"{OP_NAMESPACE}::grouped_mm_weight_grad", mutates_args=())
def _grouped_weight_grad(a_PK: torch.Tensor, grad_PM: torch.Tensor, offs_N: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(b) of ``_grouped_mm``: each group's a^T grad -> [N, K, M] (zero for groups without rows)."""
    if a_PK.dtype == grad_PM.dtype and _aligned(a_PK.t().contiguous()) and _aligned(grad_PM.contiguous()):
        return F.grouped_mm(a_PK.t().contiguous(), grad_PM.contiguous(), offs=offs_N)
    out = a_PK.new_zeros(offs_N.shape[0], a_PK.shape[1], grad_PM.shape[1])
    start = 0
    for e, end in enumerate(offs_N.tolist()):
        if end > start:
            out[e] = a_PK[start:end].t() @ grad_PM[start:end]
        start = end
    return out


@_grouped_weight_grad.register_fake
def _grouped_weight_grad_fake(a_PK, grad_PM, offs_N):
    return a_PK.new_empty(offs_N.shape[0], a_PK.shape[1], grad_PM.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad_PM):
    a_PK, b_NKM, offs_N = ctx.saved_tensors
    grad_a = _grouped_mm(grad_PM.contiguous(), b_NKM.transpose(1, 2).contiguous(), offs_N)
    grad_b = _grouped_weight_grad(a_PK, grad_PM, offs_N).to(b_NKM.dtype)
    return grad_a.to(a_PK.dtype), grad_b, None


_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _scale(h_PF: torch.Tensor, pairs: SortedPairs) -> torch.Tensor:
    """Router weight of each pair, applied to the hidden rows before the output projection: by linearity the same
    as scaling the output rows, and the hidden rows are narrower (F or E, not D), so this pass moves less memory."""
    return h_PF * pairs.weight_P[:, None].to(h_PF.dtype)


def _combine(y_PD: torch.Tensor, pairs: SortedPairs, n_tokens: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Add each pair's (already weighted) output into its token's row."""
    out_TD = torch.zeros(n_tokens, y_PD.shape[1], dtype=out_dtype, device=y_PD.device)
    return out_TD.index_add_(0, pairs.token_P, y_PD.to(out_dtype))


def project_sorted(a: torch.Tensor, w_NKM: torch.Tensor, pairs: SortedPairs, gather: bool) -> torch.Tensor:
    """Each pair's row times its expert's matrix -> [P, M]. gather=True: ``a`` is per token [T, K] and is read
    through pairs.token_P; gather=False: ``a`` is already one row per sorted pair [P, K]."""
    a_PK = a.index_select(0, pairs.token_P) if gather else a
    return grouped_mm(a_PK, w_NKM, pairs.offs_N)


def expert_mlp_sorted(x_TD, w_in_NFD, w_out_NFD, routing: Routing, activation: str, project) -> torch.Tensor:
    """Sorted-dispatch expert MLP over any grouped ``project`` (this module's or the Triton one)."""
    pairs = SortedPairs(routing)
    h_PF = activate(project(x_TD, w_in_NFD.transpose(1, 2), pairs, True), activation)
    y_PD = project(_scale(h_PF, pairs), w_out_NFD, pairs, False)
    return _combine(y_PD, pairs, x_TD.shape[0], x_TD.dtype)


# From this many (token, expert) pairs per expert on average (prefill of about 1K tokens and more), the grouped
# product's one big gathered copy of the inputs and its [pairs, D] output no longer stay in cache, and a loop that
# gathers, multiplies, activates and scatters one expert at a time (each expert's rows hot in cache) is faster or
# equal: at D=1024, 32 experts of 128, top-4, 1 thread, 34 vs 33 ms at 1024 tokens, 63 vs 63-99 ms at 2048 and
# 128 vs 205 ms at 4096 (benchmarks/cpu_mlp_paths.md). A few Python operations per expert cost nothing at that size.
LOOP_PAIRS_PER_EXPERT = 128


def expert_mlp_cpu(
    x_TD: torch.Tensor, w_in_NFD: torch.Tensor, w_out_NFD: torch.Tensor, routing: Routing, activation: str
) -> torch.Tensor:
    """Expert MLP on the CPU path that suits the token count; same contract as ``expert_mlp_reference``."""
    if x_TD.shape[0] == 1:
        return expert_mlp_one_token(x_TD, w_in_NFD, w_out_NFD, routing, activation)
    # oneDNN's products, one expert at a time, beat the grouped ones (benchmarks/cpu_products.md)
    if onednn_suits(x_TD, w_in_NFD[0]):
        return expert_mlp_per_expert(x_TD, w_in_NFD, w_out_NFD, routing, activation)
    loop_pairs = LOOP_PAIRS_PER_EXPERT * routing.n_experts
    # T*K bounds the pair count, so decode-size batches skip counting the mask (a reduction and a host sync).
    if routing.indices.numel() >= loop_pairs and int(routing.mask.sum()) >= loop_pairs:
        return expert_mlp_per_expert(x_TD, w_in_NFD, w_out_NFD, routing, activation)
    return expert_mlp_sorted(x_TD, w_in_NFD, w_out_NFD, routing, activation, project_sorted)


def expert_mlp_one_token(
    x_1D: torch.Tensor, w_in_NFD: torch.Tensor, w_out_NFD: torch.Tensor, routing: Routing, activation: str
) -> torch.Tensor:
    """Batch-1 decode: per selected expert, one matrix-vector product with its input rows and one (accumulating)
    with its output rows, both read in place. Only the selected experts' weights are read, each once, nothing is
    gathered or copied: 0.163 ms against 0.275 ms for gathering the input rows into one product (D=1024, 4 of 32
    GeLU experts of 128, 2 threads; benchmarks/cpu_mlp_paths.md). The loop is over K experts, not N, and runs
    inside the custom op, where the host sync that lists them costs nothing."""
    keep = routing.mask.view(-1)
    experts = routing.indices.view(-1)[keep].tolist()
    weights = routing.weights.view(-1)[keep].tolist()
    x_D = x_1D.view(-1).to(w_in_NFD.dtype)
    y_D = torch.zeros(x_D.shape[0], dtype=w_out_NFD.dtype, device=x_D.device)
    for e, weight in zip(experts, weights, strict=True):
        h_F = activate(w_in_NFD[e] @ x_D, activation)
        y_D.addmv_(w_out_NFD[e].t(), h_F.to(y_D.dtype), alpha=weight)
    return y_D.view(1, -1).to(x_1D.dtype)


def expert_mlp_gathered(
    x_TD: torch.Tensor, w_in_NFD: torch.Tensor, w_out_NFD: torch.Tensor, routing: Routing, activation: str
) -> torch.Tensor:
    """Decode in a compiled graph (no more (token, slot) pairs than experts): each slot's expert weights indexed and
    multiplied as broadcast multiply-and-sum reductions, which inductor fuses with the indexing, so only the selected
    experts' rows are read, with no copy and no library call per product; the slots a threshold routing leaves
    unselected count at weight zero. Eager, the indexing would copy the selected weights: compiled graphs only."""
    e_TK = routing.indices
    weight_TK = torch.where(routing.mask, routing.weights, 0).to(x_TD.dtype)
    h_TKF = activate((w_in_NFD[e_TK] * x_TD[:, None, None, :]).sum(-1), activation) * weight_TK[..., None]
    return (h_TKF[..., None] * w_out_NFD[e_TK]).sum((1, 2))


def expert_mlp_per_expert(
    x_TD: torch.Tensor, w_in_NFD: torch.Tensor, w_out_NFD: torch.Tensor, routing: Routing, activation: str
) -> torch.Tensor:
    """Long prefill: one expert at a time over the expert-sorted pairs (see LOOP_PAIRS_PER_EXPERT); bf16 is
    computed in fp32 where the CPU has no native bf16 products (see ``upcast_bf16``)."""
    compute = torch.float32 if upcast_bf16(x_TD, LOOP_PAIRS_PER_EXPERT) else x_TD.dtype
    return _loop_experts(
        x_TD,
        routing,
        activation,
        lambda e, a: fast_linear(a, w_in_NFD[e].to(compute)),
        lambda e, h: fast_linear(h, w_out_NFD[e].to(compute).t()),
        compute,
    )


def expert_mlp_packed(
    x_TD: torch.Tensor,
    packed_in: list[torch.Tensor],
    packed_out: list[torch.Tensor],
    routing: Routing,
    activation: str,
) -> torch.Tensor:
    """``expert_mlp_per_expert`` on weights packed by ``dsmoe.kernels.onednn.pack`` (fp32, eager): expert e's input
    weight [F_in, D] is ``packed_in[e]``, its output weight [D, F] ``packed_out[e]``. A DS-MoE-1B model decodes
    batches of 16 / 64 1.37x / 1.36x faster with packed weights (benchmarks/throughput.md)."""
    return _loop_experts(
        x_TD,
        routing,
        activation,
        lambda e, a: packed_linear(a, packed_in[e]),
        lambda e, h: packed_linear(h, packed_out[e]),
        torch.float32,
    )


def _loop_experts(x_TD, routing: Routing, activation: str, up, down, compute: torch.dtype) -> torch.Tensor:
    """For each expert e with pairs: its tokens' rows through ``up(e, rows)``, activated, scaled by the pairs'
    weights, through ``down(e, h)`` and added into their tokens' outputs, in ``compute`` precision."""
    pairs = SortedPairs(routing)
    out_TD = torch.zeros(x_TD.shape, dtype=compute, device=x_TD.device)
    start = 0
    for e, end in enumerate(pairs.offs_N.tolist()):
        if end > start:
            tokens = pairs.token_P[start:end]
            h = activate(up(e, x_TD.index_select(0, tokens).to(compute)), activation)
            out_TD.index_add_(0, tokens, down(e, h * pairs.weight_P[start:end, None].to(compute)))
        start = end
    return out_TD.to(x_TD.dtype)


def batch_major(batch_T: torch.Tensor, batch_size: int) -> bool:
    """Whether the tokens are laid out batch-major, every row the same length (what MoA.forward passes)."""
    n = batch_T.shape[0]
    if batch_size == 0 or n % batch_size:
        return False
    return torch.equal(
        batch_T, torch.arange(batch_size, device=batch_T.device).repeat_interleave(n // batch_size)
    )


def moa_sorted(
    x_TD, wq_NED, wo_NED, routing: Routing, ctx: AttentionContext, project=project_sorted
) -> torch.Tensor:
    """Sparse mixture of attention heads over any grouped ``project``; same contract as ``moa_reference``.

    Only the selected experts' query rows and output rows are multiplied (grouped products over the sorted pairs).
    The attention itself runs once for all heads in one fused SDPA call (``_attend_all_heads``).
    """
    if not (ctx.batch_major or batch_major(ctx.batch_T, ctx.k_BHSd.shape[0])):
        return moa_reference(x_TD, wq_NED, wo_NED, routing, ctx)  # another layout: the reference handles any
    pairs = SortedPairs(routing)
    q_TNE = x_TD.new_zeros(x_TD.shape[0], *wq_NED.shape[:2])
    q_TNE[pairs.token_P, pairs.expert_P] = project(x_TD, wq_NED.transpose(1, 2), pairs, True)
    o_TNE = _attend_all_heads(q_TNE, ctx)
    y_PD = project(_scale(o_TNE[pairs.token_P, pairs.expert_P], pairs), wo_NED, pairs, False)
    return _combine(y_PD, pairs, x_TD.shape[0], x_TD.dtype)


# From this many (token, expert) pairs per attention expert on average (prefill of a few hundred tokens and more at
# top-8 of 16), multiplying each expert's query and output rows by its own tokens (``moa_per_expert``) beats computing
# every head of every token (``moa_all_heads``). At the DS-MoE-1B shape, prepacked, one layer: 1.05x / 1.22x / 1.29x
# as fast at 128 / 256 / 512 pairs per expert (prefill of 4 x 64 to 4 x 256 tokens), but 0.58x / 0.80x at 8 / 32
# (decode batches of 16 / 64, which read every expert's rows either way) (benchmarks/cpu_attention_paths.py).
ATTENTION_LOOP_PAIRS_PER_EXPERT = 128


def moa_cpu(
    x_TD: torch.Tensor, wq_NED: torch.Tensor, wo_NED: torch.Tensor, routing: Routing, ctx: AttentionContext
) -> torch.Tensor:
    """Sparse attention on the CPU path that suits the tokens; same contract as ``moa_reference``. Where oneDNN
    multiplies fp32 weights: many pairs per expert (prefill), one expert at a time (``moa_per_expert``); fewer
    (decode), every head at once (``moa_all_heads``). Otherwise the grouped products (``moa_sorted``)."""
    if not (ctx.batch_major or batch_major(ctx.batch_T, ctx.k_BHSd.shape[0])):
        return moa_reference(x_TD, wq_NED, wo_NED, routing, ctx)  # another layout: the reference handles any
    if onednn_suits(x_TD, wq_NED[0]) and loops_experts(routing):
        return moa_per_expert(x_TD, wq_NED, wo_NED, routing, ctx)
    if onednn_suits(x_TD, wq_NED.flatten(0, 1)):
        return moa_all_heads(
            x_TD,
            routing,
            ctx,
            lambda x: fast_linear(x, wq_NED.flatten(0, 1)),
            lambda o: fast_linear(o, wo_NED.flatten(0, 1).t()),
        )
    return moa_sorted(x_TD, wq_NED, wo_NED, routing, ctx)


def loops_experts(routing: Routing) -> bool:
    """Whether attention experts are multiplied one at a time: ATTENTION_LOOP_PAIRS_PER_EXPERT pairs each or more."""
    loop_pairs = ATTENTION_LOOP_PAIRS_PER_EXPERT * routing.n_experts
    # T*K bounds the pair count, so decode-size batches skip counting the mask (a reduction and a host sync)
    return routing.indices.numel() >= loop_pairs and int(routing.mask.sum()) >= loop_pairs


def moa_all_heads(x_TD: torch.Tensor, routing: Routing, ctx: AttentionContext, query, output) -> torch.Tensor:
    """Sparse attention as dense products: every expert's query heads for every token (``query``: [T, D] ->
    [T, N * E]), one attention call, and one output product (``output``: [T, N * E] -> [T, D]) over every head
    scaled by its expert's weight, zero for the experts a token did not select: the same sum as over the selected
    experts alone. Where the tokens together select every expert (decode batches), the weights read are the same
    and two products beat two per expert; at one token it reads every expert's rows (compiled decode gathers only
    the selected ones: ``moa_gathered``)."""
    t, n = x_TD.shape[0], routing.n_experts
    o_TNE = _attend_all_heads(query(x_TD).view(t, n, -1), ctx)
    return output((o_TNE * routing.dense_weights().to(o_TNE.dtype)[..., None]).flatten(1))


def moa_per_expert(
    x_TD: torch.Tensor, wq_NED: torch.Tensor, wo_NED: torch.Tensor, routing: Routing, ctx: AttentionContext
) -> torch.Tensor:
    """Sparse attention over several tokens, one expert at a time (as ``expert_mlp_per_expert`` for the MLP): each
    expert's query rows multiply its tokens' rows, every head attends in one call (``_attend_all_heads``), and each
    expert's output rows multiply its tokens' heads, through oneDNN where it suits (``fast_linear``)."""
    return _loop_attention_experts(
        x_TD,
        routing,
        ctx,
        wq_NED.shape[1],
        lambda e, a: fast_linear(a, wq_NED[e]),
        lambda e, o: fast_linear(o, wo_NED[e].t()),
    )


def moa_packed(
    x_TD: torch.Tensor,
    packed_q: list[torch.Tensor],
    packed_o: list[torch.Tensor],
    width: int,
    routing: Routing,
    ctx: AttentionContext,
) -> torch.Tensor:
    """``moa_per_expert`` on weights packed by ``dsmoe.kernels.onednn.pack`` (fp32, eager, batch-major tokens): expert
    e's query rows [E, D] are ``packed_q[e]``, its output rows as [D, E] ``packed_o[e]``; E = ``width``."""
    return _loop_attention_experts(
        x_TD,
        routing,
        ctx,
        width,
        lambda e, a: packed_linear(a, packed_q[e]),
        lambda e, o: packed_linear(o, packed_o[e]),
    )


def _loop_attention_experts(
    x_TD, routing: Routing, ctx: AttentionContext, width: int, query, output
) -> torch.Tensor:
    """For each attention expert e with pairs: its tokens' query heads (``width`` values) by ``query(e, rows)``;
    then every head attends at once; then each expert's heads, scaled by the pairs' weights, through
    ``output(e, o)`` into their tokens' outputs. Batch-major tokens only (``_attend_all_heads``)."""
    pairs = SortedPairs(routing)
    q_TNE = x_TD.new_zeros(x_TD.shape[0], routing.n_experts, width)
    groups = []
    start = 0
    for e, end in enumerate(pairs.offs_N.tolist()):
        if end > start:
            tokens = pairs.token_P[start:end]
            q_TNE[tokens, e] = query(e, x_TD.index_select(0, tokens))
            groups.append((e, tokens, pairs.weight_P[start:end, None]))
        start = end
    o_TNE = _attend_all_heads(q_TNE, ctx)
    out_TD = torch.zeros_like(x_TD)
    for e, tokens, weight in groups:
        out_TD.index_add_(0, tokens, output(e, o_TNE[tokens, e] * weight.to(x_TD.dtype)))
    return out_TD


def moa_gathered(
    x_TD: torch.Tensor, wq_NED: torch.Tensor, wo_NED: torch.Tensor, routing: Routing, ctx: AttentionContext
) -> torch.Tensor:
    """Sparse attention in a compiled decode step (top-k, batch-major, no more (token, slot) pairs than experts), as
    ``expert_mlp_gathered`` for the MLP: the selected experts' query rows and output rows indexed inside broadcast
    multiply-and-sum reductions, which inductor fuses with the indexing, so only their rows are read, with no copy
    and no library call. The attention itself runs as in ``moa_sorted``. Eager, the indexing would copy the selected
    weights: compiled graphs only."""
    e_TK = routing.indices
    slots_TKE = e_TK[..., None].expand(-1, -1, wq_NED.shape[1])
    q_TKE = (wq_NED[e_TK] * x_TD[:, None, None, :]).sum(-1)
    q_TNE = x_TD.new_zeros(x_TD.shape[0], *wq_NED.shape[:2]).scatter(1, slots_TKE, q_TKE)
    o_TKE = _attend_all_heads(q_TNE, ctx).gather(1, slots_TKE) * routing.weights[..., None].to(x_TD.dtype)
    return (o_TKE[..., None] * wo_NED[e_TK]).sum((1, 2)).to(x_TD.dtype)


def _attend_all_heads(q_TNE: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Every expert's heads attend to ``ctx`` in one fused SDPA call, for batch-major tokens: rotary positions on the
    queries [T, N, E], then attention over the visible slots -> [T, N, E]. Unselected heads come with a zero query
    and their outputs are never read, which costs far less than per-expert attention calls."""
    k_BHSd, v_BHSd = ctx.k_BHSd, ctx.v_BHSd
    b, s, head_dim = k_BHSd.shape[0], k_BHSd.shape[2], k_BHSd.shape[-1]
    t = q_TNE.shape[0] // b
    pos_Bt = ctx.pos_T.view(b, t)
    q_BHtd = apply_rope(
        q_TNE.view(b, t, -1, head_dim), ctx.cos_Sd[pos_Bt][:, :, None], ctx.sin_Sd[pos_Bt][:, :, None]
    ).transpose(1, 2)
    if ctx.visible_TS is None:
        visible = torch.arange(s, device=q_TNE.device)[None, None, :] <= pos_Bt[:, :, None]
    else:
        visible = ctx.visible_TS.view(b, t, s)
    gqa = q_BHtd.shape[1] != k_BHSd.shape[1]
    o_BHtd = F.scaled_dot_product_attention(
        q_BHtd, k_BHSd, v_BHSd, attn_mask=visible[:, None], enable_gqa=gqa
    )
    return o_BHtd.transpose(1, 2).reshape(q_TNE.shape)
