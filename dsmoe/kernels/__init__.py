"""Sparse expert kernels. ``expert_mlp`` and ``moa`` pick the fastest implementation for the device; every
implementation has the signature of its plain reference in ``reference.py`` and is tested against it.

Inference runs through two ``torch.library`` custom ops, ``dsmoe::expert_mlp`` and ``dsmoe::moa``, with fake
(shape-only) implementations, so ``torch.compile`` traces a sparse forward as one graph: the data-dependent work
(sorting pairs by expert, their counts) happens inside the op. Eager calls skip the op's dispatch and run its body
directly (the same function). In the op: CUDA -> sorted dispatch with torch's grouped products (``sorted``: 1.7-1.9x
the Triton scatter-to-scatter kernels' tokens/s on an H200, benchmarks/gpu/README.md); CPU -> the path that suits
the token count (``cpu.py``); anything else -> the reference. ``DSMOE_KERNELS`` forces one inference path on any
device (for debugging and benchmarks): ``reference``, ``sorted`` or ``triton`` (``triton_kernels.py``).

A gradient is needed (SMoE training) -> no custom op, but a differentiable path: on the CPU the sorted grouped
products (autograd runs through ``grouped_mm``), elsewhere the reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import torch

from dsmoe.kernels.cpu import (
    OP_NAMESPACE,
    expert_mlp_cpu,
    expert_mlp_sorted,
    moa_cpu,
    moa_sorted,
    project_sorted,
)
from dsmoe.kernels.reference import expert_mlp_reference, moa_reference
from dsmoe.kernels.triton_kernels import expert_mlp_triton, moa_triton
from dsmoe.model.routing import Routing

__all__ = ["expert_mlp", "moa", "select"]


FORCEABLE = ("reference", "sorted", "triton")


def _forced() -> str | None:
    """The path DSMOE_KERNELS names, if any."""
    forced = os.environ.get("DSMOE_KERNELS") or None
    if forced is not None and forced not in FORCEABLE:
        raise ValueError(f"DSMOE_KERNELS={forced!r}: use one of {', '.join(FORCEABLE)}, or unset it")
    return forced


def select(x: torch.Tensor, *params: torch.Tensor) -> str:
    """Which implementation serves these tensors: 'reference', 'triton', 'cpu', 'sorted', or (with a gradient)
    'grouped' (the differentiable sorted path on the CPU)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in (x, *params)):
        return "grouped" if x.device.type == "cpu" and _forced() != "reference" else "reference"
    return _inference_impl(x)


def _inference_impl(x: torch.Tensor) -> str:
    forced = _forced()
    if forced is not None:
        return forced
    if x.is_cuda:
        return "sorted"
    if x.device.type == "cpu":
        return "cpu"
    return "reference"


_EXPERT_MLP: dict[str, Callable[..., torch.Tensor]] = {
    "reference": expert_mlp_reference,
    "cpu": expert_mlp_cpu,
    "triton": expert_mlp_triton,
    "sorted": partial(expert_mlp_sorted, project=project_sorted),
}
_MOA: dict[str, Callable[..., torch.Tensor]] = {
    "reference": moa_reference,
    "cpu": moa_cpu,
    "triton": moa_triton,
    "sorted": moa_cpu,
}


def _routing(
    indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, n_experts: int, all_valid: bool
):
    return Routing(indices=indices, weights=weights, mask=mask, n_experts=n_experts, all_valid=all_valid)


@torch.library.custom_op(f"{OP_NAMESPACE}::expert_mlp", mutates_args=())
def expert_mlp_op(
    x_TD: torch.Tensor,
    w_in_NFD: torch.Tensor,
    w_out_NFD: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    mask_TK: torch.Tensor,
    all_valid: bool,
    activation: str,
) -> torch.Tensor:
    """Sparse expert MLP for inference (``reference.expert_mlp_reference`` with the Routing as its tensors)."""
    routing = _routing(indices_TK, weights_TK, mask_TK, w_in_NFD.shape[0], all_valid)
    return _EXPERT_MLP[_inference_impl(x_TD)](x_TD, w_in_NFD, w_out_NFD, routing, activation)


@expert_mlp_op.register_fake
def _expert_mlp_fake(x_TD, w_in_NFD, w_out_NFD, indices_TK, weights_TK, mask_TK, all_valid, activation):
    return torch.empty_like(x_TD)


@torch.library.custom_op(f"{OP_NAMESPACE}::moa", mutates_args=())
def moa_op(
    x_TD: torch.Tensor,
    wq_NED: torch.Tensor,
    wo_NED: torch.Tensor,
    k_BHSd: torch.Tensor,
    v_BHSd: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    mask_TK: torch.Tensor,
    all_valid: bool,
    batch_T: torch.Tensor,
    pos_T: torch.Tensor,
    cos_Sd: torch.Tensor,
    sin_Sd: torch.Tensor,
    visible_TS: torch.Tensor | None,
) -> torch.Tensor:
    """Sparse mixture of attention heads for inference (``reference.moa_reference``)."""
    routing = _routing(indices_TK, weights_TK, mask_TK, wq_NED.shape[0], all_valid)
    impl = _MOA[_inference_impl(x_TD)]
    return impl(x_TD, wq_NED, wo_NED, k_BHSd, v_BHSd, routing, batch_T, pos_T, cos_Sd, sin_Sd, visible_TS)


@moa_op.register_fake
def _moa_fake(x_TD, wq_NED, wo_NED, k_BHSd, v_BHSd, indices_TK, weights_TK, mask_TK, all_valid, *rest):
    return torch.empty_like(x_TD)


def expert_mlp(
    x_TD: torch.Tensor, w_in_NFD: torch.Tensor, w_out_NFD: torch.Tensor, routing: Routing, activation: str
) -> torch.Tensor:
    """Sparse expert MLP (see ``reference.expert_mlp_reference``) on the fastest path for the inputs."""
    impl = select(x_TD, w_in_NFD, w_out_NFD, routing.weights)
    if impl == "grouped":
        return expert_mlp_sorted(x_TD, w_in_NFD, w_out_NFD, routing, activation, project_sorted)
    if impl == "reference":
        return expert_mlp_reference(x_TD, w_in_NFD, w_out_NFD, routing, activation)
    if not torch.compiler.is_compiling():  # eager: the op's body, without its dispatch (tens of us a call)
        return _EXPERT_MLP[impl](x_TD, w_in_NFD, w_out_NFD, routing, activation)
    r = routing
    return expert_mlp_op(x_TD, w_in_NFD, w_out_NFD, r.indices, r.weights, r.mask, r.all_valid, activation)


def moa(x_TD, wq_NED, wo_NED, k_BHSd, v_BHSd, routing, batch_T, pos_T, cos_Sd, sin_Sd, visible_TS=None):
    """Sparse mixture of attention heads (see ``reference.moa_reference``) on the fastest path for the inputs."""
    args = (x_TD, wq_NED, wo_NED, k_BHSd, v_BHSd)
    impl = select(*args, routing.weights)
    if impl == "grouped":
        return moa_sorted(*args, routing, batch_T, pos_T, cos_Sd, sin_Sd, visible_TS, project_sorted)
    if impl == "reference":
        return moa_reference(*args, routing, batch_T, pos_T, cos_Sd, sin_Sd, visible_TS)
    if not torch.compiler.is_compiling():  # eager: the op's body without its dispatch
        return _MOA[impl](*args, routing, batch_T, pos_T, cos_Sd, sin_Sd, visible_TS)
    r = routing
    return moa_op(
        *args, r.indices, r.weights, r.mask, r.all_valid, batch_T, pos_T, cos_Sd, sin_Sd, visible_TS
    )
