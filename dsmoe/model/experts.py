"""MLP experts with stacked weights, and the MoE MLP layer (router + experts).

Expert e is ``act(x W_in[e]^T) W_out[e]``. The weights of all N experts are stacked so that computing every expert
at once is one matrix product of width N * F: exactly the cost of a dense FFN of that width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.kernels import expert_mlp
from dsmoe.kernels.reference import activate
from dsmoe.model.router import Router
from dsmoe.model.routing import RouterRecord, Routing, route
from dsmoe.model.settings import AUTO_KERNELS, Kernels, SparseSetting


class MLPExperts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, d_expert: int, activation: str):
        super().__init__()
        self.n_experts, self.d_expert, self.activation = n_experts, d_expert, activation
        self.width_in = (
            2 * d_expert if activation == "swiglu" else d_expert
        )  # F_in: SwiGLU's gate and up halves
        # Rows of each expert's projections are contiguous: w_in[e] is [F_in, D], w_out[e] is [F, D].
        self.w_in = nn.Parameter(torch.empty(n_experts, self.width_in, d_model))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_expert, d_model))

    def up(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert's input projection at once: x W_in^T -> [T, N * F_in]."""
        return F.linear(x_TD, self.w_in.flatten(0, 1))

    def down(self, h_TK: torch.Tensor) -> torch.Tensor:
        """Every expert's output projection at once, summed: h [T, N * F] times the stacked W_out -> [T, D]."""
        return h_TK @ self.w_out.flatten(0, 1)

    def dense(self, x_TD: torch.Tensor, probs_TN: torch.Tensor | None) -> torch.Tensor:
        """All experts at once, each scaled by its router probability (dense training / dense inference)."""
        n, f = self.n_experts, self.d_expert
        h_TNF = activate(self.up(x_TD).view(-1, n, self.width_in), self.activation)
        if probs_TN is not None:
            h_TNF = h_TNF * probs_TN[..., None].to(h_TNF.dtype)
        return self.down(h_TNF.reshape(-1, n * f))

    def sparse(self, x_TD: torch.Tensor, routing: Routing, kernels: Kernels = AUTO_KERNELS) -> torch.Tensor:
        """Only the selected (token, expert) pairs of ``routing``, on the implementation ``kernels`` names."""
        return expert_mlp(x_TD, self.w_in, self.w_out, routing, self.activation, kernels)


class MoEMLP(nn.Module):
    """Router + experts. Dense regime: one expert, no router. Which experts a token runs is the ``setting`` the
    forward is given (from the model's SparsePlan): every expert for dense training, top-k for an SMoE."""

    kind = "mlp"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        # for messages; forward never reads it, so that every layer shares one compiled graph
        self.layer_idx = layer_idx
        self.router = Router(cfg.d_model, cfg.n_mlp_experts) if cfg.has_mlp_router else None
        self.experts = MLPExperts(cfg.n_mlp_experts, cfg.d_model, cfg.d_expert, cfg.activation)

    def forward(
        self,
        x_TD: torch.Tensor,
        setting: SparseSetting,
        kernels: Kernels = AUTO_KERNELS,
        mask_T: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterRecord]:
        """x_TD: the tokens [T, D]; setting: how the router picks experts; kernels: which implementation runs the
        selected ones; mask_T: True for real tokens (threshold_topk's batch mean counts only these). Returns the
        output [T, D] and the record of what the router did."""
        n_tokens = x_TD.shape[0]
        if self.router is None:
            return self.experts.dense(x_TD, None), RouterRecord(self.kind, n_tokens, None, None, mask_T)
        probs_TN = self.router(x_TD)
        if setting.strategy == "dense":
            out, routing = self.experts.dense(x_TD, probs_TN), None
        else:
            routing = route(probs_TN, setting, mask_T)
            out = self.experts.sparse(x_TD, routing, kernels)
        return out, RouterRecord(self.kind, n_tokens, probs_TN, routing, mask_T)
