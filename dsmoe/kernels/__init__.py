"""Sparse expert kernels. ``expert_mlp`` and ``moa`` pick the fastest implementation for the device; every
implementation has the signature of its plain reference in ``reference.py`` and is tested against it.

Dispatch: a gradient is needed (SMoE training) -> the differentiable reference; CUDA tensors with Triton installed
-> the Triton scatter-to-scatter kernels; CPU -> sorted dispatch with grouped products (``cpu.py``); anything else
-> the reference. ``DSMOE_KERNELS=reference`` forces the reference everywhere (for debugging and benchmarks).
"""

from __future__ import annotations

import os

import torch

from dsmoe.kernels.cpu import expert_mlp_cpu, moa_cpu
from dsmoe.kernels.reference import expert_mlp_reference, moa_reference
from dsmoe.kernels.triton_kernels import TRITON_AVAILABLE, expert_mlp_triton, moa_triton

__all__ = ["expert_mlp", "moa", "select"]


def select(x: torch.Tensor, *params: torch.Tensor) -> str:
    """Which implementation serves these tensors: 'reference', 'triton' or 'cpu'."""
    if os.environ.get("DSMOE_KERNELS") == "reference":
        return "reference"
    if torch.is_grad_enabled() and any(p.requires_grad for p in (x, *params)):
        return "reference"
    if x.is_cuda and TRITON_AVAILABLE:
        return "triton"
    if x.device.type == "cpu":
        return "cpu"
    return "reference"


_EXPERT_MLP = {"reference": expert_mlp_reference, "cpu": expert_mlp_cpu, "triton": expert_mlp_triton}
_MOA = {"reference": moa_reference, "cpu": moa_cpu, "triton": moa_triton}


def expert_mlp(x_TD, w_in_NFD, w_out_NFD, routing, activation):
    """Sparse expert MLP (see ``reference.expert_mlp_reference``) on the fastest path for the inputs."""
    impl = _EXPERT_MLP[select(x_TD, w_in_NFD, w_out_NFD, routing.weights)]
    return impl(x_TD, w_in_NFD, w_out_NFD, routing, activation)


def moa(x_TD, wq_NED, wo_NED, k_BHSd, v_BHSd, routing, batch_T, pos_T, cos_Sd, sin_Sd, visible_TS=None):
    """Sparse mixture of attention heads (see ``reference.moa_reference``) on the fastest path for the inputs."""
    impl = _MOA[select(x_TD, wq_NED, wo_NED, k_BHSd, v_BHSd, routing.weights)]
    return impl(x_TD, wq_NED, wo_NED, k_BHSd, v_BHSd, routing, batch_T, pos_T, cos_Sd, sin_Sd, visible_TS)
