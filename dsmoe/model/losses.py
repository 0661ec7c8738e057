"""Auxiliary router losses. Pure functions of the router probabilities; the model returns their values, it never
stores them, so a training loop can log and weight them as it likes."""

from __future__ import annotations

import torch

from dsmoe.model.routing import RouterRecord


def _masked_mean(x_T: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0, counting only rows where mask is True."""
    if mask_T is None:
        return x_T.mean(dim=0)
    m = mask_T.to(x_T.dtype).view(-1, *([1] * (x_T.dim() - 1)))
    return (x_T * m).sum(dim=0) / m.sum().clamp_min(1.0)


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats, with 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=dim)


def mutual_information_loss(probs_TN: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Paper eq. (4)-(5), following ModuleFormer:

        L_MI = -H( mean_x S(x) ) + mean_x H( S(x) )

    over the tokens x of the batch (rows of ``probs_TN`` where ``mask_T`` is True; padding excluded), entropies in
    nats. The first term rewards balanced load across experts, the second confident (sparse) routing per token.
    Its minimum, -log N, is reached only when every token routes one-hot and the experts are used equally.
    """
    marginal_N = _masked_mean(probs_TN, mask_T)
    conditional = _masked_mean(entropy(probs_TN), mask_T)
    return -entropy(marginal_N) + conditional


def switch_loss(
    probs_TN: torch.Tensor, indices_TK: torch.Tensor, mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer load-balancing loss for top-K routing (dMoE's form, no capacity):

        L = N * sum_i f_i * P_i

    f_i = share of the T*K token-to-expert assignments that go to expert i (not differentiable), P_i = mean router
    probability of expert i. Equals 1 under perfect balance.
    """
    n_experts = probs_TN.shape[-1]
    one_hot_TN = torch.zeros_like(probs_TN).scatter_(1, indices_TK, 1.0)
    f_N = _masked_mean(one_hot_TN, mask_T) / indices_TK.shape[1]
    p_N = _masked_mean(probs_TN, mask_T)
    return n_experts * (f_N.detach() * p_N).sum()


def router_loss(record: RouterRecord, regime: str, smoe_top_k: int) -> torch.Tensor:
    """The auxiliary loss of one router from its record, over its real tokens: the switch loss of its trained
    top-k for an SMoE (whatever setting ran), the MI loss otherwise."""
    if record.probs_TN is None:
        raise ValueError(f"{record.kind} layer {record.layer} has no router, so no router loss")
    if regime == "smoe":
        indices_TK = record.probs_TN.topk(smoe_top_k, dim=-1).indices
        return switch_loss(record.probs_TN, indices_TK, record.mask_T)
    return mutual_information_loss(record.probs_TN, record.mask_T)
