"""The transformer: one architecture for Dense, SMoE and DS-MoE. Forward returns logits and every loss term; no
training code lives here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.model.attention import KVCache, LayerKV, MoA, Padding
from dsmoe.model.experts import MoEMLP
from dsmoe.model.losses import router_loss
from dsmoe.model.plan import SparsePlan, trained_plan
from dsmoe.model.rope import rope_tables
from dsmoe.model.routing import RouterRecord
from dsmoe.model.settings import Kernels, SparseSetting


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.att_norm, self.att = make_norm(cfg), MoA(cfg, layer_idx)
        self.mlp_norm, self.mlp = make_norm(cfg), MoEMLP(cfg, layer_idx)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        att_setting: SparseSetting,
        mlp_setting: SparseSetting,
        kernels: Kernels,
        cache: LayerKV | None = None,
        start_pos: int | torch.Tensor = 0,
        mask_T: torch.Tensor | None = None,
        padding: Padding | None = None,
    ) -> tuple[torch.Tensor, RouterRecord, RouterRecord]:
        a, att_record = self.att(
            self.att_norm(x_BTD), cos, sin, att_setting, kernels, cache, start_pos, mask_T, padding
        )
        x_BTD = x_BTD + a
        b, t, d = x_BTD.shape
        m, mlp_record = self.mlp(self.mlp_norm(x_BTD).reshape(b * t, d), mlp_setting, kernels, mask_T)
        return x_BTD + m.view(b, t, d), att_record, mlp_record


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V] (or [B, 1, V] with last_only)
    loss: torch.Tensor | None = None  # lm_loss + weighted auxiliary losses
    lm_loss: torch.Tensor | None = None
    mi_att: torch.Tensor | None = None  # sum over layers of the attention routers' MI loss
    mi_mlp: torch.Tensor | None = None  # sum over layers of the MLP routers' MI loss
    switch: torch.Tensor | None = None  # mean over layers of the SMoE switch loss (dMoE's definition)
    routers: list[RouterRecord] = field(
        default_factory=list
    )  # per MoE layer, attention and MLP, in depth order
    router_losses: list[torch.Tensor] = field(default_factory=list)  # per layer with a router, in that order


class Transformer(nn.Module):
    rope_cos: torch.Tensor  # buffers (register_buffer): declared for type checkers
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.trained_plan = trained_plan(cfg)  # what a forward without a plan runs (from cfg; never changes)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, init_std), residual output projections scaled by 1/sqrt(2 n_layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:  # norms
                (p.fill_(1.0) if name.endswith("weight") else p.zero_())
            elif name.endswith(("att.wo", "experts.w_out")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                p.normal_(0.0, std)

    def block_list(self) -> list[Block]:
        """The blocks in depth order, typed as Blocks (iterating an nn.ModuleList gives plain Modules)."""
        return [cast(Block, block) for block in self.blocks]

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        dtype = dtype or self.embed.weight.dtype
        return KVCache(self.cfg, batch_size, max_len, dtype, self.embed.weight.device)

    def hidden(
        self,
        idx_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        *,
        plan: SparsePlan | None = None,
        token_mask_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        last_only: bool = False,
        key_mask_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[RouterRecord]]:
        """idx_BT: token ids. plan: how every layer picks its experts (None: as trained). targets_BT: next-token ids, -100 where no loss is taken (padding). token_mask_BT:
        True for real input tokens; routers' auxiliary losses average over these only (default: positions whose
        target is not -100, or all; never padding of key_mask_BS). cache/start_pos: incremental decoding; a 0-d
        tensor start_pos (the compiled decode step: shapes that never change) reads every slot of the cache through
        a mask, and needs key_mask_BS over all of them ([B, cache.max_len]; slots past the new tokens are never
        read). last_only: logits of the last position. key_mask_BS: True for real tokens in every slot, cached and
        new ([B, start_pos + T], Hugging Face's attention_mask); padding anywhere, e.g. left-padded prompts of different
        lengths, is then never attended to and does not advance the rotary positions.

        Returns the final-normed hidden states [B, T, D] (or [B, 1, D]) before the LM head (``forward`` applies
        ``head``), and the routers' records."""
        b, t = idx_BT.shape
        if token_mask_BT is None and targets_BT is not None:
            token_mask_BT = targets_BT != -100
        padding = None
        if isinstance(start_pos, torch.Tensor):  # static shapes: attend to every slot of the cache, masked
            if cache is None or key_mask_BS is None or tuple(key_mask_BS.shape) != (b, cache.max_len):
                raise ValueError("a tensor start_pos needs a cache and key_mask_BS over all of its slots")
            padding = Padding.from_key_mask(key_mask_BS.bool(), t, start_pos)
        elif start_pos + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + t} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        elif key_mask_BS is not None and not bool(key_mask_BS.bool().all()):  # all real: nothing to mask
            if tuple(key_mask_BS.shape) != (b, start_pos + t):
                raise ValueError(
                    f"key_mask_BS has shape {tuple(key_mask_BS.shape)}; it must cover the cached and "
                    f"new tokens: ({b}, {start_pos + t})"
                )
            key_mask_BS = key_mask_BS.bool()
            padding = Padding.from_key_mask(key_mask_BS, t)
            real_BT = key_mask_BS[:, start_pos:]
            token_mask_BT = real_BT if token_mask_BT is None else token_mask_BT & real_BT
        mask_T = None if token_mask_BT is None else token_mask_BT.reshape(b * t)

        plan = plan or self.trained_plan
        x = self.embed(idx_BT)
        routers: list[RouterRecord] = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layer(i)
            settings = plan.setting("att", i), plan.setting("mlp", i), plan.kernels
            x, att_record, mlp_record = block(
                x, self.rope_cos, self.rope_sin, *settings, layer_cache, start_pos, mask_T, padding
            )
            att_record.layer = mlp_record.layer = i
            routers += [att_record, mlp_record]
        return self.final_norm(x[:, -1:] if last_only else x), routers

    def head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The LM head: logits over the vocabulary (tied to the embedding when ``tie_embeddings``)."""
        return F.linear(x_BTD, self.embed.weight) if self.lm_head is None else self.lm_head(x_BTD)

    def forward(
        self,
        idx_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        *,
        plan: SparsePlan | None = None,
        token_mask_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        last_only: bool = False,
        key_mask_BS: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits [B, T, V] and, with ``targets_BT``, the losses; the arguments are those of ``hidden``."""
        x, routers = self.hidden(
            idx_BT,
            targets_BT,
            plan=plan,
            token_mask_BT=token_mask_BT,
            cache=cache,
            start_pos=start_pos,
            last_only=last_only,
            key_mask_BS=key_mask_BS,
        )
        logits = self.head(x)
        out = ModelOutput(logits=logits, routers=routers)
        if targets_BT is None:
            return out
        cfg = self.cfg
        out.lm_loss = F.cross_entropy(logits.float().flatten(0, 1), targets_BT.flatten(), ignore_index=-100)
        out.loss = out.lm_loss
        routed = [r for r in routers if r.probs_TN is not None]
        out.router_losses = [router_loss(r, cfg.regime, cfg.smoe_top_k) for r in routed]
        losses = {
            kind: [loss for r, loss in zip(routed, out.router_losses, strict=True) if r.kind == kind]
            for kind in ("att", "mlp")
        }
        if cfg.regime == "smoe":  # as dMoE (MegaBlocks): the routers' switch losses averaged over layers
            out.switch = torch.stack(losses["att"] + losses["mlp"]).sum() / cfg.n_layers
            out.loss = out.loss + cfg.switch_loss_weight * out.switch
        else:  # DS-MoE: MI loss per router, summed over layers, weighted separately for attention and MLP
            if losses["att"]:
                out.mi_att = torch.stack(losses["att"]).sum()
                out.loss = out.loss + cfg.alpha_att * out.mi_att
            if losses["mlp"]:
                out.mi_mlp = torch.stack(losses["mlp"]).sum()
                out.loss = out.loss + cfg.alpha_mlp * out.mi_mlp
        return out
