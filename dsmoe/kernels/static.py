"""Sorted dispatch whose shapes never depend on the routing: for a variable-K routing (threshold) in a decode step
captured in a CUDA graph, where the sorted path's one host sync (counting the valid pairs to drop the rest,
``cpu.SortedPairs``) would end the capture. Same contracts as ``reference.py``, tested against it.

Every (token, slot) pair keeps its place: the dropped ones are sorted after every expert's group, which torch's
grouped product leaves unread and unwritten (rows past the last offset), and their output rows are zeroed before the
combine. They cost the gathered rows' copy, no product.
"""

from __future__ import annotations

import torch

from dsmoe.kernels.cpu import SortedPairs, _attend_all_heads, _combine, _scale, project_sorted
from dsmoe.kernels.reference import AttentionContext, activate, moa_reference
from dsmoe.model.routing import Routing


class StaticPairs(SortedPairs):
    """All T x K (token, slot) pairs of a Routing sorted by expert, the dropped ones last (``cpu.SortedPairs`` keeps
    only the valid ones), and ``valid_P``, False for the dropped pairs."""

    __slots__ = ("valid_P",)

    def __init__(self, routing: Routing):  # not SortedPairs': that one counts the valid pairs on the host
        n, k = routing.n_experts, routing.indices.shape[1]
        expert_flat = routing.indices.masked_fill(~routing.mask, n).flatten()  # dropped: sentinel expert n
        order = torch.argsort(expert_flat, stable=True)
        counts = torch.zeros(n + 1, dtype=expert_flat.dtype, device=expert_flat.device).scatter_add_(
            0, expert_flat, torch.ones_like(expert_flat)
        )
        self.offs_N = counts[:n].cumsum(0).to(torch.int32)
        self.valid_P = torch.arange(order.shape[0], device=order.device) < self.offs_N[-1]
        self.token_P = torch.div(order, k, rounding_mode="floor")
        self.expert_P = routing.indices.flatten()[order]  # the pair's own expert, in range even where dropped
        self.weight_P = routing.weights.flatten()[order]


def _kept(rows_PM: torch.Tensor, pairs: StaticPairs) -> torch.Tensor:
    """The valid pairs' rows, zeros for the dropped ones (whose rows the grouped product never wrote)."""
    return torch.where(
        pairs.valid_P[:, None], rows_PM, torch.zeros((), dtype=rows_PM.dtype, device=rows_PM.device)
    )


def expert_mlp_static(
    x_TD: torch.Tensor, w_in_NFD: torch.Tensor, w_out_NFD: torch.Tensor, routing: Routing, activation: str
) -> torch.Tensor:
    pairs = StaticPairs(routing)
    h_PF = activate(project_sorted(x_TD, w_in_NFD.transpose(1, 2), pairs, True), activation)
    y_PD = _kept(project_sorted(_scale(h_PF, pairs), w_out_NFD, pairs, False), pairs)
    return _combine(y_PD, pairs, x_TD.shape[0], x_TD.dtype)


def moa_static(
    x_TD: torch.Tensor, wq_NED: torch.Tensor, wo_NED: torch.Tensor, routing: Routing, ctx: AttentionContext
) -> torch.Tensor:
    if not ctx.batch_major:  # the decode step's layout is; checking another's would need a host sync
        return moa_reference(x_TD, wq_NED, wo_NED, routing, ctx)
    pairs = StaticPairs(routing)
    q_TNE = x_TD.new_zeros(x_TD.shape[0], *wq_NED.shape[:2])
    q_TNE[pairs.token_P, pairs.expert_P] = _kept(
        project_sorted(x_TD, wq_NED.transpose(1, 2), pairs, True), pairs
    )
    o_TNE = _attend_all_heads(q_TNE, ctx)
    y_PD = _kept(
        project_sorted(_scale(o_TNE[pairs.token_P, pairs.expert_P], pairs), wo_NED, pairs, False), pairs
    )
    return _combine(y_PD, pairs, x_TD.shape[0], x_TD.dtype)
