"""oneDNN products for fp32 inference on the CPU, as a module swap in the style of ``quantize`` (and of the vLLM
model's): the modules that hold projection weights compute their products through
``dsmoe.kernels.onednn.fast_linear`` (oneDNN where it is faster than MKL: large fp32 weights, no gradient;
benchmarks/cpu_products.md).

* ``nn.Linear`` (attention keys and values, an untied LM head) -> ``OneDNNLinear``; a tied LM head gets one too,
  reading the embedding's weight;
* ``MLPExperts`` -> ``OneDNNMLPExperts``, ``MoA`` -> ``OneDNNMoA``, converted in place. oneDNN takes only weights
  whose rows are contiguous, so the output-side weights (``w_out`` [N, F, D], ``wo`` [N, E, D]) get transposed
  storage: the same parameter, now a [N, F, D] view of a contiguous [N, D, F] tensor. Every kernel reads them as
  before, ``dsmoe.kernels.cpu`` finds each expert's [D, F] output rows contiguous and multiplies them by oneDNN, and
  the state dict keeps its names, shapes and values.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from dsmoe.kernels.onednn import AVAILABLE, fast_linear
from dsmoe.model.attention import MoA
from dsmoe.model.experts import MLPExperts

M = TypeVar("M", bound=nn.Module)


class OneDNNLinear(nn.Module):
    """``nn.Linear`` without bias, its product through ``fast_linear``. ``tied``: the weight is another module's (the
    embedding's), read here but not registered again, so the state dict gains no key."""

    def __init__(self, weight: torch.Tensor, tied: bool = False):
        super().__init__()
        if tied:
            self.__dict__["weight"] = weight
        else:
            self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight)


def _transpose_storage(p: torch.Tensor) -> None:
    """Parameter ``p`` [N, A, B] becomes a view of a contiguous [N, B, A] copy: same values, each [B, A] contiguous."""
    p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)


def _times_transposed(h_TK: torch.Tensor, w_t_NDF: torch.Tensor) -> torch.Tensor:
    """h [T, N*F] times the experts' stacked [N*F, D] weight, stored transposed as [N, D, F] -> [T, D]."""
    n, _, f = w_t_NDF.shape
    out = fast_linear(h_TK[:, :f], w_t_NDF[0])
    for e in range(1, n):
        out += fast_linear(h_TK[:, e * f : (e + 1) * f], w_t_NDF[e])
    return out


class OneDNNMLPExperts(MLPExperts):
    """MLPExperts whose output weight ``w_out`` [N, F, D] has [N, D, F] storage."""

    @classmethod
    def convert(cls, experts: MLPExperts) -> None:
        experts.__class__ = cls
        _transpose_storage(experts.w_out)

    def up(self, x_TD: torch.Tensor) -> torch.Tensor:
        return fast_linear(x_TD, self.w_in.flatten(0, 1))

    def down(self, h_TK: torch.Tensor) -> torch.Tensor:
        return _times_transposed(h_TK, self.w_out.transpose(1, 2))


class OneDNNMoA(MoA):
    """MoA whose output rows ``wo`` [N, E, D] have [N, D, E] storage."""

    @classmethod
    def convert(cls, att: MoA) -> None:
        att.__class__ = cls
        _transpose_storage(att.wo)

    def query(self, x_TD: torch.Tensor) -> torch.Tensor:
        return fast_linear(x_TD, self.wq.flatten(0, 1))

    def output(self, o_TE: torch.Tensor) -> torch.Tensor:
        return _times_transposed(o_TE, self.wo.transpose(1, 2))


def use_onednn(model: M) -> M:
    """Swap ``model``'s projection modules (a Transformer's, or a module's holding one) for oneDNN ones, in place,
    and return it in eval mode. Nothing changes without oneDNN, on another device or dtype than
    fp32 on the CPU, or in modules already swapped (int8 ones included)."""
    first = next(model.parameters(), None)
    if not AVAILABLE or first is None or first.device.type != "cpu" or first.dtype != torch.float32:
        return model
    for module in list(model.modules()):
        # by exact class, so that int8 modules (subclasses) and swapped ones are left alone
        if type(module) is MLPExperts:
            OneDNNMLPExperts.convert(module)
        elif type(module) is MoA:
            OneDNNMoA.convert(module)
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(module, name, OneDNNLinear(child.weight))
        if getattr(module, "lm_head", False) is None and hasattr(module, "embed"):  # a tied LM head
            module.lm_head = OneDNNLinear(module.embed.weight, tied=True)
    return model.eval()


def uses_onednn(model: nn.Module) -> bool:
    return any(isinstance(m, (OneDNNLinear, OneDNNMLPExperts, OneDNNMoA)) for m in model.modules())
