"""AdamW with decoupled weight decay on weight matrices only, and the token-counted cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from dsmoe.training.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # norms and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def lr_at(tokens: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_tokens``, then cosine decay from ``lr`` to ``min_lr`` at ``total_tokens``."""
    if cfg.warmup_tokens > 0 and tokens < cfg.warmup_tokens:
        return cfg.lr * (tokens + cfg.global_batch_tokens) / (cfg.warmup_tokens + cfg.global_batch_tokens)
    span = max(cfg.total_tokens - cfg.warmup_tokens, 1)
    progress = min(max(tokens - cfg.warmup_tokens, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
