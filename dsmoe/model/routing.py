"""Sparse-inference expert selection: topk / threshold / threshold_topk -> one Routing representation.

A Routing holds, per token, the top-K_max experts by score (``indices``, descending), their scores (``weights``) and
a ``mask`` that drops the pairs a strategy does not select. Fixed-K and variable-K strategies therefore share one
dispatch path: kernels only ever see the valid (token, expert, weight) pairs.
"""

from __future__ import annotations

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

    def dense_weights(self) -> torch.Tensor:
        """[T, N]: each expert's weight for each token, zero for the experts it did not select (or dropped)."""
        dense = self.weights.new_zeros(self.indices.shape[0], self.n_experts)
        return dense.scatter_(1, self.indices, self.weights * self.mask)

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
    padding out of the batch statistics of threshold_topk.

    Shapes never depend on the data, so selection compiles without graph breaks and never waits for the device:
    the variable-K strategies take all N experts in descending order and mask those past each token's count (the
    kernels only ever see the valid pairs, so the masked ones cost nothing but their place in the sort)."""
    n_experts = probs_TN.shape[-1]
    k = setting.k if setting.strategy == "topk" else n_experts
    weights, indices = torch.topk(probs_TN, k, dim=-1, sorted=True)  # type: ignore[arg-type]
    if setting.strategy in ("dense", "topk"):
        mask = torch.ones_like(indices, dtype=torch.bool)
    else:
        if setting.threshold is None:  # SparseSetting.__post_init__ rules this out
            raise ConfigError(f"strategy '{setting.strategy}' needs a threshold")
        if setting.strategy == "threshold":
            # The scores are sorted, so the experts above the threshold are a prefix of each row: the mask is the
            # comparison itself, with the first expert always kept (at least one per token). Fewer small ops than
            # counting and comparing positions, which shows at batch 1 on small models.
            mask = weights * n_experts > setting.threshold
            mask[:, 0] = True
        else:
            # threshold_topk: one K for the batch, the mean count (at least one per token) over real tokens,
            # rounded half up (2.5 -> 3, 3.5 -> 4; not to even as Python's round() would), in [1, N]; 1 when no
            # token is real.
            counts_T = (probs_TN * n_experts > setting.threshold).sum(dim=-1).clamp_min(1)
            real_T = torch.ones_like(counts_T, dtype=torch.bool) if mask_T is None else mask_T
            total = (counts_T * real_T).sum().float()
            mean = total / real_T.sum().clamp_min(1)
            k_mean = torch.where(real_T.any(), torch.floor(mean + 0.5), torch.ones_like(mean))
            counts_T = k_mean.clamp(1, n_experts).long().expand_as(counts_T)
            mask = torch.arange(n_experts, device=probs_TN.device)[None, :] < counts_T[:, None]
    if setting.normalize:
        weights = weights * mask / (weights * mask).sum(dim=-1, keepdim=True)
    return Routing(
        indices=indices,
        weights=weights,
        mask=mask,
        n_experts=n_experts,
        all_valid=setting.strategy in ("dense", "topk"),
    )


def mixing_weights(
    probs_TN: torch.Tensor, setting: SparseSetting, mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """[T, N]: the weight each expert's output gets under ``setting``: every router score for 'dense'; otherwise the
    selected experts' scores (normalized if the setting says so) and zero for the others. Computing every expert and
    mixing with these weights gives exactly the sparse result (vLLM's MoA does, around its paged attention)."""
    if setting.strategy == "dense":
        return probs_TN
    return route(probs_TN, setting, mask_T).dense_weights()


@dataclass
class RouterRecord:
    """What one MoE layer's router did in one forward: the model returns one per layer, and losses, training
    statistics and the active-parameter meter are computed from these, outside the layers."""

    kind: str  # "att" or "mlp"
    n_tokens: int
    probs_TN: torch.Tensor | None  # router probabilities (with their gradient); None: a layer with one expert
    routing: Routing | None  # the selection that ran; None: every expert ran (dense computation)
    mask_T: torch.Tensor | None = (
        None  # True for the real tokens (losses and the meter count these); None: all
    )
    # depth, set by Transformer.hidden: a layer's forward never reads its own index, so that every block of a model
    # compiles to one graph (torch.compile specialises on integer attributes, one recompile per layer otherwise)
    layer: int = -1

    def counts_T(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Experts each token used [T] (on ``device``, or where the routing is)."""
        if self.routing is not None:
            return self.routing.counts_per_token.to(device)
        n = 1 if self.probs_TN is None else self.probs_TN.shape[-1]
        return torch.full((self.n_tokens,), n, dtype=torch.long, device=device)
