"""The executable specification of sparse expert computation: gather each expert's tokens, compute, scatter-add.

Plain PyTorch with a Python loop over experts. Every fast path in ``dsmoe.kernels`` has this signature and is tested
against these functions. Differentiable, so sparse training (SMoE) runs through it as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsmoe.model.rope import apply_rope
from dsmoe.model.routing import Routing


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """GeLU on [.., F] or SwiGLU on [.., 2F] (gate half first, then the up projection)."""
    if activation == "gelu":
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def expert_mlp_reference(
    x_TD: torch.Tensor, w_in_NFD: torch.Tensor, w_out_NFD: torch.Tensor, routing: Routing, activation: str
) -> torch.Tensor:
    """out[t] = sum over selected (t, e) of weight * act(x[t] W_in[e]^T) W_out[e].

    w_in_NFD: [N, F or 2F, D] (rows of expert e's input projection); w_out_NFD: [N, F, D].
    """
    token_P, expert_P, weight_P, counts = routing.pairs()
    out_TD = torch.zeros_like(x_TD)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        tokens, weights = token_P[start : start + n], weight_P[start : start + n]
        start += n
        h = activate(F.linear(x_TD[tokens], w_in_NFD[e]), activation)
        y = (h @ w_out_NFD[e]) * weights[:, None].to(h.dtype)
        out_TD.index_add_(0, tokens, y.to(out_TD.dtype))  # accumulate in x's dtype
    return out_TD


@dataclass
class AttentionContext:
    """What a token's selected query heads attend to: the keys and values all experts share [B, n_kv, S, d]; each
    token's batch row and rotary position [T]; the rotary tables [S, d]; and, in padded batches, the cache slots each
    token sees [T, S] (None: slots up to its position). ``batch_major``: the caller vouches that the tokens are laid
    out batch-major, every row the same length (as MoA.forward lays them out), so no path needs to check it."""

    k_BHSd: torch.Tensor
    v_BHSd: torch.Tensor
    batch_T: torch.Tensor
    pos_T: torch.Tensor
    cos_Sd: torch.Tensor
    sin_Sd: torch.Tensor
    visible_TS: torch.Tensor | None = None
    batch_major: bool = False


def moa_reference(
    x_TD: torch.Tensor, wq_NED: torch.Tensor, wo_NED: torch.Tensor, routing: Routing, ctx: AttentionContext
) -> torch.Tensor:
    """Mixture-of-attention-heads output for the selected (token, expert) pairs (paper eq. 7-8).

    Expert e owns query rows wq[e] ([E = N_head * head_dim, D]) and output rows wo[e] ([E, D]). Token t (batch row
    batch_T[t], rotary position pos_T[t]) attends with its expert's heads to the shared keys/values of ``ctx``: to
    the cache slots visible_TS[t] when given (padded batches), else to slots <= pos_T[t]. Query head h of the model
    reads key/value head h // (n_query_heads / n_kv).
    """
    k_BHSd, v_BHSd, batch_T, pos_T = ctx.k_BHSd, ctx.v_BHSd, ctx.batch_T, ctx.pos_T
    cos_Sd, sin_Sd, visible_TS = ctx.cos_Sd, ctx.sin_Sd, ctx.visible_TS
    n_experts, width, _ = wq_NED.shape
    head_dim = k_BHSd.shape[-1]
    n_head = width // head_dim
    group = n_experts * n_head // k_BHSd.shape[1]
    token_P, expert_P, weight_P, counts = routing.pairs()
    out_TD = torch.zeros_like(x_TD)
    key_pos_S = torch.arange(k_BHSd.shape[2], device=x_TD.device)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        tokens, weights = token_P[start : start + n], weight_P[start : start + n]
        start += n
        kv_heads = torch.arange(e * n_head, (e + 1) * n_head, device=x_TD.device) // group
        q_MHd = F.linear(x_TD[tokens], wq_NED[e]).view(n, n_head, head_dim)
        q_MHd = apply_rope(q_MHd, cos_Sd[pos_T[tokens]][:, None], sin_Sd[pos_T[tokens]][:, None])
        o_ME = x_TD.new_empty(n, width)
        # one batch row at a time, so every token reads its row's keys and values in place (no per-token copies)
        for row in torch.unique(batch_T[tokens]).tolist():
            here = batch_T[tokens] == row
            k_HSd, v_HSd = k_BHSd[row, kv_heads].float(), v_BHSd[row, kv_heads].float()
            scores = torch.einsum("mhd,hsd->mhs", q_MHd[here].float(), k_HSd) / math.sqrt(head_dim)
            if visible_TS is None:
                visible = key_pos_S[None, None, :] <= pos_T[tokens][here][:, None, None]
            else:
                visible = visible_TS[tokens][here][:, None, :]
            attn = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            o_ME[here] = torch.einsum("mhs,hsd->mhd", attn, v_HSd).reshape(-1, width).to(x_TD.dtype)
        y = (o_ME @ wo_NED[e]) * weights[:, None].to(o_ME.dtype)
        out_TD.index_add_(0, tokens, y.to(out_TD.dtype))
    return out_TD
