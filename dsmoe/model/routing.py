"""Sparse-inference expert selection: topk / threshold / threshold_topk -> one Routing representation.

A Routing holds, per token, the top-K_max experts by score (``indices``, descending), their scores (``weights``) and
a ``mask`` that drops the pairs a strategy does not select. Fixed-K and variable-K strategies therefore share one
dispatch path: kernels only ever see the valid (token, expert, weight) pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsmoe.config import ConfigError
from dsmoe.model.settings import SparseSetting


@dataclass
class Routing:
    indices: torch.Tensor  # [T, K] long, experts by descending score
    weights: torch.Tensor  # [T, K] scores used to mix expert outputs
    mask: torch.Tensor  # [T, K] bool, False for pairs dropped before dispatch
    n_experts: int
    all_valid: bool = False  # True when the mask is known to be all True (dense, top-k): kernels may skip it

    @property
    def counts_per_token(self) -> torch.Tensor:
        return self.mask.sum(dim=-1)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The valid (token, expert, weight) pairs sorted by expert, and tokens per expert [N]."""
        tokens = torch.arange(self.indices.shape[0], device=self.indices.device)[:, None].expand_as(
            self.indices
        )
        token_P, expert_P, weight_P = tokens[self.mask], self.indices[self.mask], self.weights[self.mask]
        order = torch.argsort(expert_P, stable=True)
        counts = torch.bincount(expert_P, minlength=self.n_experts)
        return token_P[order], expert_P[order], weight_P[order], counts


def route(probs_TN: torch.Tensor, setting: SparseSetting, mask_T: torch.Tensor | None = None) -> Routing:
    """Select experts for each token from router probabilities [T, N]. ``mask_T`` (True for real tokens) keeps
    padding out of the batch statistics of threshold / threshold_topk."""
    n_experts = probs_TN.shape[-1]
    if setting.strategy == "dense":
        k = n_experts
    elif setting.strategy == "topk":
        k = setting.k  # type: ignore[assignment]
    else:
        if setting.threshold is None:  # SparseSetting.__post_init__ rules this out
            raise ConfigError(f"strategy '{setting.strategy}' needs a threshold")
        keep_TN = probs_TN * n_experts > setting.threshold
        counts_T = keep_TN.sum(dim=-1).clamp_min(1)  # at least one expert per token
        real_T = counts_T if mask_T is None else counts_T[mask_T]
        if setting.strategy == "threshold":
            k = int(counts_T.max()) if counts_T.numel() else 1
        else:
            # The batch mean rounds half up (2.5 -> 3, 3.5 -> 4), not to even as Python's round() would.
            k = (
                max(1, min(n_experts, math.floor(float(real_T.float().mean()) + 0.5)))
                if real_T.numel()
                else 1
            )
    weights, indices = torch.topk(probs_TN, k, dim=-1, sorted=True)
    if setting.strategy == "threshold":
        mask = torch.arange(k, device=probs_TN.device)[None, :] < counts_T[:, None]
    else:
        mask = torch.ones_like(indices, dtype=torch.bool)
    if setting.normalize:
        weights = weights * mask / (weights * mask).sum(dim=-1, keepdim=True)
    return Routing(
        indices=indices,
        weights=weights,
        mask=mask,
        n_experts=n_experts,
        all_valid=setting.strategy != "threshold",
    )
