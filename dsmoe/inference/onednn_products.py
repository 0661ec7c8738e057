"""oneDNN products for fp32 inference on the CPU, as a module swap in the style of ``quantize`` (and of the vLLM
model's): the modules that hold projection weights compute their products through
``dsmoe.kernels.onednn.fast_linear`` (oneDNN where it is faster than MKL: large fp32 weights, no gradient;
benchmarks/cpu_products.md), or, for one row in a compiled decode step, as a reduction that inductor fuses
(``product``).

* ``nn.Linear`` (attention keys and values, an untied LM head) -> ``OneDNNLinear``; a tied LM head gets one too,
  reading the embedding's weight;
* ``MLPExperts`` -> ``OneDNNMLPExperts``, ``MoA`` -> ``OneDNNMoA``, converted in place. oneDNN takes only weights
  that are contiguous matrices (a strided one is ~40x slower than MKL), so the output-side weights get transposed storage,
  each parameter a view of the same values: ``w_out`` [N, F, D] of a contiguous [N, D, F] tensor, so that the
  per-expert products of ``dsmoe.kernels.cpu`` read each expert's [D, F] block; ``wo`` [N, E, D] of a contiguous
  [D, N*E] one, read whole by ``output`` (sparse attention's grouped products read it strided, as MKL allows). The
  state dict keeps its names, shapes and values.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from dsmoe.kernels.onednn import AVAILABLE, fast_linear
from dsmoe.model.attention import MoA
from dsmoe.model.experts import MLPExperts
from dsmoe.model.transformer import Transformer

M = TypeVar("M", bound=nn.Module)


# The largest weight (values) that a compiled graph multiplies by one row as a reduction. Larger ones go through
# oneDNN, whose one-row product reads them faster: with every one-row product a reduction, Dense-1B's compiled decode
# (FFN weights of 16M values) ran at 19.3 tokens/s against 36.9 eager on oneDNN (benchmarks/throughput.md).
REDUCTION_MAX_WEIGHTS = 1 << 22


def product(x: torch.Tensor, w_MK: torch.Tensor) -> torch.Tensor:
    """``x @ w^T`` by the fastest path: ``fast_linear``, except one row by a weight of at most REDUCTION_MAX_WEIGHTS
    values in a compiled graph, which is a broadcast multiply and sum that inductor turns into one reduction over the
    weight's rows, with no library call: SmolLM2's compiled decode products, all as reductions, take 18.8 ms against
    37.7 through oneDNN and 46.9 through MKL (benchmarks/cpu_products.md). Eager, the broadcast would materialize a
    weight-sized tensor, so it is taken only while compiling."""
    if torch.compiler.is_compiling() and x.numel() == x.shape[-1] and w_MK.numel() <= REDUCTION_MAX_WEIGHTS:
        return (x.unsqueeze(-2) * w_MK).sum(-1)
    return fast_linear(x, w_MK)


class OneDNNLinear(nn.Module):
    """``nn.Linear`` without bias, its product through ``product``. ``tied``: the weight is another module's (the
    embedding's), read here but not registered again, so the state dict gains no key."""

    def __init__(self, weight: torch.Tensor, tied: bool = False):
        super().__init__()
        if tied:
            self.__dict__["weight"] = weight
        else:
            self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return product(x, self.weight)


def _store_blocks_transposed(p: torch.Tensor) -> None:
    """Stacked weight ``p`` [N, F, D] becomes a view of a contiguous [N, D, F] tensor: the same values, each expert's
    [D, F] block (``p[e].t()``) a contiguous matrix, which per-expert products take."""
    p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)


def _store_stack_transposed(p: torch.Tensor) -> None:
    """Stacked weight ``p`` [N, F, D] becomes a view of a contiguous [D, N*F] tensor: the same values, the whole
    stack (``p.flatten(0, 1).t()``) one contiguous matrix, which a product over every expert takes."""
    n, f, _ = p.shape
    p.data = p.data.flatten(0, 1).t().contiguous().t().unflatten(0, (n, f))


class OneDNNMLPExperts(MLPExperts):
    """MLPExperts whose output weight ``w_out`` [N, F, D] has [N, D, F] storage."""

    @classmethod
    def convert(cls, experts: MLPExperts) -> None:
        experts.__class__ = cls
        _store_blocks_transposed(experts.w_out)

    def up(self, x_TD: torch.Tensor) -> torch.Tensor:
        return product(x_TD, self.w_in.flatten(0, 1))

    def down(self, h_TK: torch.Tensor) -> torch.Tensor:
        n, f, _ = self.w_out.shape
        out = product(h_TK[:, :f], self.w_out[0].t())
        for e in range(1, n):  # every expert at once: a DS-MoE run dense, rare in inference
            out += product(h_TK[:, e * f : (e + 1) * f], self.w_out[e].t())
        return out


class OneDNNMoA(MoA):
    """MoA whose output rows ``wo`` [N, E, D] have [D, N*E] storage."""

    @classmethod
    def convert(cls, att: MoA) -> None:
        att.__class__ = cls
        _store_stack_transposed(att.wo)

    def query(self, x_TD: torch.Tensor) -> torch.Tensor:
        return product(x_TD, self.wq.flatten(0, 1))

    def output(self, o_TE: torch.Tensor) -> torch.Tensor:
        return product(o_TE, self.wo.flatten(0, 1).t())


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
        if isinstance(module, Transformer) and module.lm_head is None:  # a tied LM head
            module.lm_head = OneDNNLinear(module.embed.weight, tied=True)  # type: ignore[assignment]
    return model.eval()


def uses_onednn(model: nn.Module) -> bool:
    return any(isinstance(m, (OneDNNLinear, OneDNNMLPExperts, OneDNNMoA)) for m in model.modules())
