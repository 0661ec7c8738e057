"""Mixture of attention heads (MoA, paper eq. 7-8) with grouped-query attention, rotary positions and a KV cache.

Attention expert e owns N_head query heads (rows e*E..(e+1)*E of W_q, E = N_head * head_dim) and the matching rows of
the output projection W_o. Keys and values (n_kv heads) are shared by all experts, so the KV cache is shared. Dense
computation runs all N_att * N_head query heads in one fused attention call, then scales each expert's heads by its
router probability before W_o.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.kernels import AttentionContext, moa
from dsmoe.model.rope import apply_rope
from dsmoe.model.router import Router
from dsmoe.model.routing import RouterRecord, Routing, route
from dsmoe.model.settings import AUTO_KERNELS, Kernels, SparseSetting


class KVCache:
    """Preallocated keys and values, one tensor per layer: [B, n_kv, max_len, head_dim] each. Each layer reads and
    writes its own through ``layer(i)``. (Separate tensors rather than one [n_layers, ...] block: a compiled step
    that writes into a slice of one shared block copies the whole block, for every layer, at every step.)"""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i])


class LayerKV:
    """One layer's keys and values [B, n_kv, max_len, head_dim] (a ``KVCache``'s own tensors, written in place)."""

    def __init__(self, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor):
        self.k, self.v = k_BHSd, v_BHSd

    def update(self, start: int | torch.Tensor, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor):
        """Write the new keys/values at slots start, start+1, ...; return what attention reads. An int start
        returns the filled slots only; a tensor start (0-d: the compiled decode step, whose shapes never change)
        returns every slot, and the caller masks the ones not yet written."""
        t, max_len = k_BHTd.shape[2], self.k.shape[2]
        if isinstance(start, torch.Tensor):
            slots = start + torch.arange(t, device=start.device)
            self.k[:, :, slots] = k_BHTd
            self.v[:, :, slots] = v_BHTd
            return self.k, self.v
        if start + t > max_len:
            raise ValueError(f"KV cache is full: writing position {start + t - 1} into a cache of {max_len}")
        self.k[:, :, start : start + t] = k_BHTd
        self.v[:, :, start : start + t] = v_BHTd
        return self.k[:, :, : start + t], self.v[:, :, : start + t]


@dataclass
class Padding:
    """Where a batch holds padding: rotary positions [B, T] of the new tokens, counting real tokens only (so a
    left-padded prompt gets the positions it would have alone), and the cache slots [B, T, S] each new token sees:
    real slots up to its own, and its own slot always (padding rows then stay finite; nothing reads them)."""

    positions_BT: torch.Tensor
    visible_BTS: torch.Tensor

    @classmethod
    def from_key_mask(
        cls, key_mask_BS: torch.Tensor, t: int, start: int | torch.Tensor | None = None
    ) -> Padding:
        """key_mask_BS: True for real tokens over every slot, cached and new (Hugging Face's attention_mask). The
        t new tokens sit in slots start, start+1, ... (default: the last t slots)."""
        s = key_mask_BS.shape[1]
        slots = torch.arange(s, device=key_mask_BS.device)
        new_T = (s - t if start is None else start) + torch.arange(t, device=key_mask_BS.device)
        positions = (key_mask_BS.long().cumsum(-1) - 1).clamp(min=0).index_select(1, new_T)
        causal_TS = slots[None, :] <= new_T[:, None]
        visible = (causal_TS[None] & key_mask_BS[:, None, :]) | (slots[None, :] == new_T[:, None])[None]
        return cls(positions, visible)


class MoA(nn.Module):
    kind = "att"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        # for messages; forward never reads it, so that every layer shares one compiled graph
        self.layer_idx = layer_idx
        self.n_experts, self.head_dim, self.n_kv = cfg.n_att_experts, cfg.head_dim, cfg.n_kv_heads
        self.n_heads = cfg.n_query_heads
        e, d = cfg.att_expert_dim, cfg.d_model
        self.wq = nn.Parameter(torch.empty(self.n_experts, e, d))  # expert e's query rows
        self.wo = nn.Parameter(torch.empty(self.n_experts, e, d))  # expert e's output rows: out = o @ wo
        self.wk = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.router = Router(d, self.n_experts) if cfg.has_att_router else None

    def query(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert's query heads at once: x W_q^T -> [T, N * E]."""
        return F.linear(x_TD, self.wq.flatten(0, 1))

    def output(self, o_TE: torch.Tensor) -> torch.Tensor:
        """Every expert's heads through their rows of W_o, summed: [T, N * E] -> [T, D]."""
        return o_TE @ self.wo.flatten(0, 1)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_q, W_o) as [N, E, D] each: what the sparse kernels read, the selected experts' rows only."""
        return self.wq, self.wo

    def sparse(
        self, x_TD: torch.Tensor, routing: Routing, ctx: AttentionContext, kernels: Kernels = AUTO_KERNELS
    ) -> torch.Tensor:
        """Only the selected (token, expert) pairs of ``routing``, attending to ``ctx``, on the implementation
        ``kernels`` names."""
        return moa(x_TD, *self.expert_weights(), routing, ctx, kernels)

    def mix(self, o_TE: torch.Tensor, weights_TN: torch.Tensor | None) -> torch.Tensor:
        """The reduce of paper eq. 8: every expert's heads [T, N * E], each expert's scaled by its weight [T, N]
        (None: weight 1, a layer of one expert), through W_o -> [T, D]."""
        if weights_TN is not None:
            o_TE = (
                o_TE.view(o_TE.shape[0], self.n_experts, -1) * weights_TN[..., None].to(o_TE.dtype)
            ).flatten(1)
        return self.output(o_TE)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_Sd: torch.Tensor,
        sin_Sd: torch.Tensor,
        setting: SparseSetting,
        kernels: Kernels = AUTO_KERNELS,
        cache: LayerKV | None = None,
        start_pos: int | torch.Tensor = 0,
        mask_T: torch.Tensor | None = None,
        padding: Padding | None = None,
    ) -> tuple[torch.Tensor, RouterRecord]:
        """x_BTD: the tokens; cos/sin: the rotary tables; setting: how the router picks experts, and kernels: which
        implementation runs the selected ones (both from the model's SparsePlan); cache/start_pos: incremental
        decoding (a tensor start_pos comes with ``padding``: the compiled decode step); mask_T: True for real
        tokens; padding: where a padded batch's real tokens are. Returns the output [B, T, D] and the record of what
        the router did."""
        b, t, d = x_BTD.shape
        if padding is None:
            assert isinstance(start_pos, int), (
                "a tensor start_pos comes with its padding (Transformer.hidden)"
            )
            cos, sin = (
                cos_Sd[start_pos : start_pos + t, None],
                sin_Sd[start_pos : start_pos + t, None],
            )  # [T, 1, d]
        else:
            pos_BT = padding.positions_BT
            cos, sin = cos_Sd[pos_BT][:, :, None], sin_Sd[pos_BT][:, :, None]  # [B, T, 1, d]
        k = apply_rope(self.wk(x_BTD).view(b, t, self.n_kv, self.head_dim), cos, sin)
        k_BHSd = k.transpose(1, 2)
        v_BHSd = self.wv(x_BTD).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            k_BHSd, v_BHSd = cache.update(start_pos, k_BHSd, v_BHSd)

        def dense(x_TD: torch.Tensor, probs_TN: torch.Tensor | None) -> torch.Tensor:
            q = apply_rope(self.query(x_TD).view(b, t, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
            o = _attend(q, k_BHSd, v_BHSd, start_pos, padding).transpose(1, 2)  # [B, T, H, d]
            return self.mix(o.reshape(b * t, -1), probs_TN)

        def sparse(x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
            batch_T = torch.arange(b, device=x_TD.device).repeat_interleave(t)
            if padding is None:
                pos_T, visible_TS = (torch.arange(t, device=x_TD.device) + start_pos).repeat(b), None
            else:
                pos_T, visible_TS = padding.positions_BT.flatten(), padding.visible_BTS.flatten(0, 1)
            ctx = AttentionContext(
                k_BHSd, v_BHSd, batch_T, pos_T, cos_Sd, sin_Sd, visible_TS, batch_major=True
            )
            return self.sparse(x_TD, routing, ctx, kernels)

        x_TD = x_BTD.reshape(b * t, d)
        if self.router is None:
            return dense(x_TD, None).view(b, t, d), RouterRecord(self.kind, b * t, None, None, mask_T)
        probs_TN = self.router(x_TD)
        if setting.strategy == "dense":
            out, routing = dense(x_TD, probs_TN), None
        else:
            routing = route(probs_TN, setting, mask_T)
            out = sparse(x_TD, routing)
        return out.view(b, t, d), RouterRecord(self.kind, b * t, probs_TN, routing, mask_T)


def _attend(
    q_BHTd, k_BHSd, v_BHSd, start_pos: int | torch.Tensor, padding: Padding | None = None
) -> torch.Tensor:
    t, s = q_BHTd.shape[2], k_BHSd.shape[2]
    gqa = q_BHTd.shape[1] != k_BHSd.shape[1]
    if padding is not None:
        return F.scaled_dot_product_attention(
            q_BHTd, k_BHSd, v_BHSd, attn_mask=padding.visible_BTS[:, None], enable_gqa=gqa
        )
    if t == s:  # no cached prefix: plain causal attention
        return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, is_causal=True, enable_gqa=gqa)
    if t == 1:  # one new token sees the whole cache
        return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, enable_gqa=gqa)
    visible = (
        torch.arange(s, device=q_BHTd.device)[None, :]
        <= start_pos + torch.arange(t, device=q_BHTd.device)[:, None]
    )
    return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, attn_mask=visible, enable_gqa=gqa)
