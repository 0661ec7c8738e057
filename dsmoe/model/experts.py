"""MLP experts with stacked weights, and the MoE MLP layer (router + experts).

Expert e is ``act(x W_in[e]^T) W_out[e]``. The weights of all N experts are stacked so that computing every expert
at once is one matrix product of width N * F: exactly the cost of a dense FFN of that width.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import kernels
from dsmoe.config import ModelConfig
from dsmoe.kernels.reference import activate
from dsmoe.model.losses import mutual_information_loss, switch_loss
from dsmoe.model.router import Router
from dsmoe.model.routing import Routing, route
from dsmoe.model.settings import SparseSetting, trained_setting


class ExpertMeter(Protocol):
    """Where a layer reports how many experts each token used (``dsmoe.inference.sparsify.ActiveMeter``)."""

    def record(self, kind: str, layer: int, counts_T: torch.Tensor, mask_T: torch.Tensor | None) -> None: ...

    def record_dense(
        self, kind: str, layer: int, n_experts: int, mask_T: torch.Tensor | None, n_tokens: int
    ) -> None: ...


class RoutedLayer(Protocol):
    """What ``mix_experts`` and ``router_aux`` read of a layer: the MLP and the attention layers both have it."""

    kind: str
    layer_idx: int
    regime: str
    train_setting: SparseSetting
    sparse: SparseSetting | None
    meter: ExpertMeter | None


class MLPExperts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, d_expert: int, activation: str):
        super().__init__()
        self.n_experts, self.d_expert, self.activation = n_experts, d_expert, activation
        width_in = 2 * d_expert if activation == "swiglu" else d_expert
        # Rows of each expert's projections are contiguous: w_in[e] is [F_in, D], w_out[e] is [F, D].
        self.w_in = nn.Parameter(torch.empty(n_experts, width_in, d_model))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_expert, d_model))

    def dense(self, x_TD: torch.Tensor, probs_TN: torch.Tensor | None) -> torch.Tensor:
        """All experts at once, each scaled by its router probability (dense training / dense inference)."""
        n, f = self.n_experts, self.d_expert
        h_TNF = F.linear(x_TD, self.w_in.flatten(0, 1)).view(-1, n, self.w_in.shape[1])
        h_TNF = activate(h_TNF, self.activation)
        if probs_TN is not None:
            h_TNF = h_TNF * probs_TN[..., None].to(h_TNF.dtype)
        return h_TNF.reshape(-1, n * f) @ self.w_out.flatten(0, 1)

    def sparse(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        return kernels.expert_mlp(x_TD, self.w_in, self.w_out, routing, self.activation)


class MoEMLP(nn.Module):
    """Router + experts. Dense regime: one expert, no router. SMoE: top-k in training and inference. DS-MoE: all
    experts in training; at inference whatever ``self.sparse`` says (set by ``dsmoe.sparsify``)."""

    kind = "mlp"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.regime = layer_idx, cfg.regime
        self.router = Router(cfg.d_model, cfg.n_mlp_experts) if cfg.has_mlp_router else None
        self.experts = MLPExperts(cfg.n_mlp_experts, cfg.d_model, cfg.d_expert, cfg.activation)
        self.train_setting = trained_setting(cfg.regime, cfg.smoe_top_k)
        self.sparse: SparseSetting | None = None  # inference override
        self.meter: ExpertMeter | None = None

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None, want_aux: bool):
        if self.router is None:
            if self.meter is not None:
                self.meter.record_dense(self.kind, self.layer_idx, 1, mask_T, x_TD.shape[0])
            return self.experts.dense(x_TD, None), None
        probs_TN = self.router(x_TD)
        out, routing = mix_experts(self, probs_TN, x_TD, self.experts.dense, self.experts.sparse, mask_T)
        return out, router_aux(self, probs_TN, routing, mask_T) if want_aux else None


def mix_experts(layer: RoutedLayer, probs_TN: torch.Tensor, x, dense_fn, sparse_fn, mask_T):
    """Run ``layer``'s experts under its active setting; shared by the MLP and attention layers."""
    setting = layer.sparse or layer.train_setting
    if setting.strategy == "dense":
        if layer.meter is not None:
            layer.meter.record_dense(
                layer.kind, layer.layer_idx, probs_TN.shape[-1], mask_T, probs_TN.shape[0]
            )
        return dense_fn(x, probs_TN), None
    routing = route(probs_TN, setting, mask_T)
    if layer.meter is not None:
        layer.meter.record(layer.kind, layer.layer_idx, routing.counts_per_token, mask_T)
    return sparse_fn(x, routing), routing


def router_aux(
    layer: RoutedLayer, probs_TN: torch.Tensor, routing: Routing | None, mask_T: torch.Tensor | None
):
    """Auxiliary loss of one router (MI for DS-MoE, switch for SMoE), with its detached probabilities and the mask
    of counted tokens (None: all), so that a trainer can compute statistics when it logs (not on every step)."""
    if layer.regime == "smoe":
        if routing is not None:
            indices = routing.indices
        else:  # a dense inference setting: the loss still takes the trained top-k
            k = layer.train_setting.k
            if k is None:
                raise RuntimeError(f"SMoE {layer.kind} layer {layer.layer_idx} has no top-k training setting")
            indices = probs_TN.topk(k, -1).indices
        loss = switch_loss(probs_TN, indices, mask_T)
    else:
        loss = mutual_information_loss(probs_TN, mask_T)
    # The mask travels beside the probabilities: indexing by it here would make the shape data-dependent and break
    # a compiled training step; the trainer selects the counted tokens only when it logs.
    return {
        "kind": layer.kind,
        "layer": layer.layer_idx,
        "loss": loss,
        "probs": probs_TN.detach(),
        "mask": mask_T,
    }
