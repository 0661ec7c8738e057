"""Sparse expert kernels: ``expert_mlp`` and ``moa`` run the implementation that a ``Kernels`` choice (passed down
from the model's SparsePlan) names for the inputs. Every implementation has the signature of its plain reference in
``reference.py`` and is tested against it.

One table, ``implementation``, maps (the choice, the inputs' device, whether a gradient is needed) to a path:

* a gradient (SMoE training): on the CPU the sorted grouped products (autograd runs through ``grouped_mm``), else
  the reference, both differentiable;
* inference, ``impl='auto'``: CPU -> ``cpu`` (the path that suits the token count, ``cpu.py``); CUDA -> ``sorted``
  (torch's grouped products: 1.7-1.9x the Triton scatter-to-scatter kernels' tokens/s on an H200,
  benchmarks/gpu/README.md); anything else -> the reference. Any path can be named instead (``Kernels("triton")``).
  ``Kernels("fused")``: the expert MLP in 4-6 Triton launches (``triton_fused.py``; not yet measured on a GPU, so
  not the default), MoA through the sorted path's grouped products, in their static-shape form on CUDA for a
  variable-K routing (no host sync, as under a CUDA graph).

A compiled forward (``Kernels(compiled=True)``) on the CPU decodes top-k routings (no more (token, slot) pairs than
experts) through ``expert_mlp_gathered`` and ``moa_gathered``, traced into the graph, where inductor fuses the
selected experts' gather into reductions (benchmarks/cpu_products.md); a threshold routing's slots span every
expert, so it keeps the custom op, whose one-token path reads only the selected ones. Otherwise a compiled forward
reaches inference paths through two ``torch.library`` custom ops, ``dsmoe::expert_mlp`` and ``dsmoe::moa``, with fake
(shape-only) implementations, so ``torch.compile`` traces a sparse forward as one graph: the data-dependent work
(sorting pairs by expert, their counts) happens inside the op.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from dsmoe.kernels.cpu import (
    expert_mlp_cpu,
    expert_mlp_gathered,
    expert_mlp_sorted,
    moa_cpu,
    moa_gathered,
    moa_sorted,
    project_sorted,
)
from dsmoe.kernels.onednn import OP_NAMESPACE
from dsmoe.kernels.reference import AttentionContext, expert_mlp_reference, moa_reference
from dsmoe.kernels.static import expert_mlp_static, moa_static
from dsmoe.kernels.triton_fused import expert_mlp_fused
from dsmoe.kernels.triton_kernels import expert_mlp_triton, moa_triton
from dsmoe.model.routing import Routing
from dsmoe.model.settings import AUTO_KERNELS, Kernels

__all__ = ["AttentionContext", "Kernels", "expert_mlp", "implementation", "kernels_for", "moa"]

_AUTO = {"cpu": "cpu", "cuda": "sorted"}  # device type -> inference path of Kernels('auto')


def kernels_for(device: torch.device, impl: str = "auto") -> Kernels:
    """The kernel choice for a model on ``device``: 'auto' resolved once to the device's inference path, or the path
    that ``impl`` names."""
    return Kernels(_AUTO.get(device.type, "reference") if impl == "auto" else impl)


def implementation(kernels: Kernels, x: torch.Tensor, needs_grad: bool = False) -> str:
    """The path that computes sparse experts for inputs like ``x``: 'reference', 'cpu', 'sorted', 'triton', 'fused',
    or (with a gradient) 'grouped', the differentiable sorted path on the CPU."""
    if needs_grad:
        return "grouped" if x.device.type == "cpu" and kernels.impl != "reference" else "reference"
    if kernels.impl != "auto":
        return kernels.impl
    return _AUTO.get(x.device.type, "reference")


_EXPERT_MLP: dict[str, Callable[..., torch.Tensor]] = {
    "reference": expert_mlp_reference,
    "cpu": expert_mlp_cpu,
    "triton": expert_mlp_triton,
    "sorted": partial(expert_mlp_sorted, project=project_sorted),
    "grouped": partial(expert_mlp_sorted, project=project_sorted),
    "sorted_static": expert_mlp_static,
    "fused": expert_mlp_fused,
}


def _moa_beside_fused(
    x_TD: torch.Tensor, wq_NED: torch.Tensor, wo_NED: torch.Tensor, routing: Routing, ctx: AttentionContext
) -> torch.Tensor:
    """MoA under Kernels('fused'), whose fused kernels are the MLP's alone: the sorted path, in its static-shape
    form where a variable-K routing on CUDA would otherwise cost a host sync."""
    if x_TD.device.type == "cuda" and not routing.all_valid:
        return moa_static(x_TD, wq_NED, wo_NED, routing, ctx)
    return moa_sorted(x_TD, wq_NED, wo_NED, routing, ctx)


_MOA: dict[str, Callable[..., torch.Tensor]] = {
    "reference": moa_reference,
    "cpu": moa_cpu,
    "triton": moa_triton,
    "sorted": moa_sorted,
    "grouped": moa_sorted,
    "sorted_static": moa_static,
    "fused": _moa_beside_fused,
}


def _top_k_decode(routing: Routing) -> bool:
    """A fixed-K routing with no more (token, slot) pairs than experts: what the gathered paths take."""
    return routing.all_valid and routing.indices.numel() <= routing.n_experts


def _graph_path(path: str, x: torch.Tensor, routing: Routing) -> str:
    """The path of a compiled forward's custom op: on CUDA, a variable-K routing takes the sorted path's static-shape
    form (``static.py``), which has no host sync, so that a decode step can be captured in a CUDA graph."""
    if path == "sorted" and x.device.type == "cuda" and not routing.all_valid:
        return "sorted_static"
    return path


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def expert_mlp(
    x_TD: torch.Tensor,
    w_in_NFD: torch.Tensor,
    w_out_NFD: torch.Tensor,
    routing: Routing,
    activation: str,
    kernels: Kernels = AUTO_KERNELS,
) -> torch.Tensor:
    """Sparse expert MLP (see ``reference.expert_mlp_reference``) on the path ``kernels`` names for the inputs."""
    path = implementation(kernels, x_TD, _needs_grad(x_TD, w_in_NFD, w_out_NFD, routing.weights))
    if not kernels.compiled or path in ("reference", "grouped"):
        return _EXPERT_MLP[path](x_TD, w_in_NFD, w_out_NFD, routing, activation)
    if path == "cpu" and _top_k_decode(routing):
        return expert_mlp_gathered(x_TD, w_in_NFD, w_out_NFD, routing, activation)
    r = routing
    return expert_mlp_op(
        x_TD,
        w_in_NFD,
        w_out_NFD,
        r.indices,
        r.weights,
        r.mask,
        r.all_valid,
        activation,
        _graph_path(path, x_TD, r),
    )


def moa(
    x_TD: torch.Tensor,
    wq_NED: torch.Tensor,
    wo_NED: torch.Tensor,
    routing: Routing,
    ctx: AttentionContext,
    kernels: Kernels = AUTO_KERNELS,
) -> torch.Tensor:
    """Sparse mixture of attention heads (see ``reference.moa_reference``) on the path ``kernels`` names."""
    path = implementation(
        kernels, x_TD, _needs_grad(x_TD, wq_NED, wo_NED, ctx.k_BHSd, ctx.v_BHSd, routing.weights)
    )
    if not kernels.compiled or path in ("reference", "grouped"):
        return _MOA[path](x_TD, wq_NED, wo_NED, routing, ctx)
    if path == "cpu" and _top_k_decode(routing) and ctx.batch_major:
        return moa_gathered(x_TD, wq_NED, wo_NED, routing, ctx)
    r, c = routing, ctx
    return moa_op(
        x_TD, wq_NED, wo_NED, r.indices, r.weights, r.mask, r.all_valid,
        c.k_BHSd, c.v_BHSd, c.batch_T, c.pos_T, c.cos_Sd, c.sin_Sd, c.visible_TS, c.batch_major,
        _graph_path(path, x_TD, r),
    )  # fmt: skip


# --- the custom ops of a compiled forward: the Routing and AttentionContext as their tensors ----------------------


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
    path: str,
) -> torch.Tensor:
    routing = _routing(indices_TK, weights_TK, mask_TK, w_in_NFD.shape[0], all_valid)
    return _EXPERT_MLP[path](x_TD, w_in_NFD, w_out_NFD, routing, activation)


@expert_mlp_op.register_fake
def _expert_mlp_fake(x_TD, *rest):
    return torch.empty_like(x_TD)


@torch.library.custom_op(f"{OP_NAMESPACE}::moa", mutates_args=())
def moa_op(
    x_TD: torch.Tensor,
    wq_NED: torch.Tensor,
    wo_NED: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    mask_TK: torch.Tensor,
    all_valid: bool,
    k_BHSd: torch.Tensor,
    v_BHSd: torch.Tensor,
    batch_T: torch.Tensor,
    pos_T: torch.Tensor,
    cos_Sd: torch.Tensor,
    sin_Sd: torch.Tensor,
    visible_TS: torch.Tensor | None,
    batch_major: bool,
    path: str,
) -> torch.Tensor:
    routing = _routing(indices_TK, weights_TK, mask_TK, wq_NED.shape[0], all_valid)
    # batch_major passed on: checking the layout again inside would be a host sync (no CUDA graph could hold it)
    ctx = AttentionContext(k_BHSd, v_BHSd, batch_T, pos_T, cos_Sd, sin_Sd, visible_TS, batch_major)
    return _MOA[path](x_TD, wq_NED, wo_NED, routing, ctx)


@moa_op.register_fake
def _moa_fake(x_TD, *rest):
    return torch.empty_like(x_TD)
