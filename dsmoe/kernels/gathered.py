"""The expert MLP of a few tokens as one traceable expression: each (token, slot) pair's expert weights gathered and
multiplied by broadcast and sum. Under torch.compile, inductor fuses the gather, the dequantization of int8 weights
(``dsmoe.inference.quantize``) and the products into reductions that read only the selected experts' int8 rows
(DS-MoE's batch-1 decode with int8 weights: 1.99x fp32's, benchmarks/int8.md). Unselected slots of a threshold
routing are computed with weight zero. Same contract as ``reference.expert_mlp_reference``."""

from __future__ import annotations

import torch

from dsmoe.kernels.reference import activate
from dsmoe.model.routing import Routing


def expert_mlp_gathered(
    x_TD: torch.Tensor, w_in_NFD: torch.Tensor, w_out_NFD: torch.Tensor, routing: Routing, activation: str
) -> torch.Tensor:
    weight_TK = torch.where(routing.mask, routing.weights, 0).to(x_TD.dtype)
    w_in_TKFD, w_out_TKFD = w_in_NFD[routing.indices], w_out_NFD[routing.indices]
    h_TKF = activate((w_in_TKFD * x_TD[:, None, None, :]).sum(-1), activation) * weight_TK[..., None]
    return (h_TKF[..., None] * w_out_TKFD).sum((1, 2))
