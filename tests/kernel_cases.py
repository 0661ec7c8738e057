"""Shared inputs for the kernel tests: router probabilities, routings and attention inputs with odd cases."""

from __future__ import annotations

import dataclasses

import torch

from dsmoe.kernels.reference import AttentionContext
from dsmoe.model.rope import rope_tables
from dsmoe.model.routing import route
from dsmoe.model.settings import SparseSetting

# Strategy grid: one expert, two, every expert (K = N), a threshold that selects a different count per token,
# threshold_topk (a batch-level K) and normalized weights.
SETTINGS = [
    SparseSetting("topk", k=1),
    SparseSetting("topk", k=2),
    SparseSetting("topk", k=4, normalize=True),
    SparseSetting("dense"),
    SparseSetting("threshold", threshold=1.0),
    SparseSetting("threshold_topk", threshold=0.8),
]
SETTING_IDS = [s.describe() + ("-norm" if s.normalize else "") for s in SETTINGS]


def peaked_probs(n_tokens: int, n_experts: int, generator: torch.Generator) -> torch.Tensor:
    """Router-like probabilities: peaked enough that thresholds select 1..several experts per token."""
    logits = torch.randn(n_tokens, n_experts, generator=generator) * 2.0
    return torch.softmax(logits, dim=-1)


def make_routing(n_tokens: int, n_experts: int, setting: SparseSetting, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    setting = (
        setting
        if setting.strategy != "topk"
        else SparseSetting("topk", k=min(setting.k, n_experts), normalize=setting.normalize)
    )
    return route(peaked_probs(n_tokens, n_experts, g), setting)


def mlp_inputs(n_tokens, n_experts, d_model, d_expert, activation, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_in = 2 * d_expert if activation == "swiglu" else d_expert
    x = torch.randn(n_tokens, d_model, generator=g).to(dtype)
    w_in = (torch.randn(n_experts, f_in, d_model, generator=g) / d_model**0.5).to(dtype)
    w_out = (torch.randn(n_experts, d_expert, d_model, generator=g) / d_expert**0.5).to(dtype)
    return x, w_in, w_out


def moa_inputs(batch, new_tokens, cached, n_experts, n_head, head_dim, n_kv, d_model, dtype, seed=0):
    """(x, wq, wo, AttentionContext) for ``new_tokens`` positions after ``cached`` cached ones, laid out as
    MoA.forward lays them out."""
    g = torch.Generator().manual_seed(seed)
    width = n_head * head_dim
    seq = cached + new_tokens
    x = torch.randn(batch * new_tokens, d_model, generator=g).to(dtype)
    wq = (torch.randn(n_experts, width, d_model, generator=g) / d_model**0.5).to(dtype)
    wo = (torch.randn(n_experts, width, d_model, generator=g) / width**0.5).to(dtype)
    k = torch.randn(batch, n_kv, seq, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, n_kv, seq, head_dim, generator=g).to(dtype)
    batch_T = torch.arange(batch).repeat_interleave(new_tokens)
    pos_T = torch.arange(cached, seq).repeat(batch)
    cos, sin = rope_tables(head_dim, seq, 10000.0)  # a row for every position, cached and new
    return x, wq, wo, AttentionContext(k, v, batch_T, pos_T, cos, sin)


def left_padded(args: tuple, pads: list[int]) -> tuple:
    """moa_inputs' arguments with row b's first pads[b] cache slots as padding: per-row rotary positions and the
    slots each token sees (``visible_TS``), as MoA.forward passes them for a left-padded batch."""
    from dsmoe.model.attention import Padding

    x, wq, wo, ctx = args
    batch, seq = ctx.k_BHSd.shape[0], ctx.k_BHSd.shape[2]
    key_mask = torch.arange(seq)[None, :] >= torch.tensor(pads)[:, None]
    padding = Padding.from_key_mask(key_mask, x.shape[0] // batch)
    padded = dataclasses.replace(
        ctx, pos_T=padding.positions_BT.flatten(), visible_TS=padding.visible_BTS.flatten(0, 1)
    )
    return x, wq, wo, padded


def tolerances(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
