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

``prepack=True`` also keeps each weight packed by oneDNN (``dsmoe.kernels.onednn.pack``, what inductor's frozen graphs
do), for eager products of two rows and more: batched decode and prefill, 1.1-1.9x faster per product from 4 to 64
rows (benchmarks/cpu_products.md), at the cost of a second copy of every weight (twice the weight memory). Packed copies are made once: swap again after changing
or moving the weights. Batch-1 and compiled steps keep reading the plain weights.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from dsmoe.kernels import onednn
from dsmoe.kernels.cpu import expert_mlp_packed, loops_experts, moa_all_heads, moa_packed
from dsmoe.kernels.onednn import AVAILABLE, PACKING, fast_linear, pack, packed_linear
from dsmoe.kernels.reference import AttentionContext
from dsmoe.model.attention import MoA
from dsmoe.model.experts import MLPExperts
from dsmoe.model.routing import Routing
from dsmoe.model.settings import AUTO_KERNELS, Kernels
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


def takes_packed(x: torch.Tensor) -> bool:
    """Whether a product of ``x`` reads the packed weight: several rows, eager (a compiled graph cannot hold the
    opaque packed tensor), no gradient (the packed op has none)."""
    return x.numel() > x.shape[-1] and not torch.compiler.is_compiling() and not torch.is_grad_enabled()


class OneDNNLinear(nn.Module):
    """``nn.Linear`` without bias, its product through ``product``. ``tied``: the weight is another module's (the
    embedding's), read here but not registered again, so the state dict gains no key. ``packed``: the weight packed
    by ``pack``, or None."""

    def __init__(self, weight: torch.Tensor, tied: bool = False):
        super().__init__()
        if tied:
            self.__dict__["weight"] = weight
        else:
            self.weight = weight
        self.packed: torch.Tensor | None = None

    def prepack(self) -> None:
        if worth_packing(self.weight):
            self.packed = pack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and takes_packed(x):
            return packed_linear(x, self.packed)
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
    """MLPExperts whose output weight ``w_out`` [N, F, D] has [N, D, F] storage; ``packed_in`` / ``packed_out``: each
    expert's [F_in, D] and [D, F] weights packed by ``pack``, or None."""

    packed_in: list[torch.Tensor] | None = None
    packed_out: list[torch.Tensor] | None = None

    @classmethod
    def convert(cls, experts: MLPExperts) -> None:
        experts.__class__ = cls
        _store_blocks_transposed(experts.w_out)

    def prepack(self) -> None:
        if not worth_packing(self.w_in[0]):
            return
        self.packed_in = [pack(w) for w in self.w_in]
        self.packed_out = [pack(w.t()) for w in self.w_out]

    def up(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.packed_in is not None and takes_packed(x_TD):
            return torch.cat([packed_linear(x_TD, p) for p in self.packed_in], dim=-1)
        return product(x_TD, self.w_in.flatten(0, 1))

    def down(self, h_TK: torch.Tensor) -> torch.Tensor:
        n, f, _ = self.w_out.shape
        packed = self.packed_out if self.packed_out is not None and takes_packed(h_TK) else None

        def expert(e: int) -> torch.Tensor:
            h = h_TK[:, e * f : (e + 1) * f]
            return product(h, self.w_out[e].t()) if packed is None else packed_linear(h, packed[e])

        out = expert(0)
        for e in range(1, n):  # every expert at once: a DS-MoE run dense, rare in inference
            out += expert(e)
        return out

    def sparse(self, x_TD: torch.Tensor, routing: Routing, kernels: Kernels = AUTO_KERNELS) -> torch.Tensor:
        if (
            self.packed_in is not None
            and self.packed_out is not None
            and kernels.impl in ("auto", "cpu")
            and takes_packed(x_TD)
        ):
            return expert_mlp_packed(x_TD, self.packed_in, self.packed_out, routing, self.activation)
        return super().sparse(x_TD, routing, kernels)


class OneDNNMoA(MoA):
    """MoA whose output rows ``wo`` [N, E, D] have [D, N*E] storage; ``packed_q`` / ``packed_o``: every expert's
    query rows [N*E, D] and output projection [D, N*E] packed by ``pack`` (dense attention), and
    ``packed_q_experts`` / ``packed_o_experts`` each expert's [E, D] and [D, E] (sparse attention), or None."""

    packed_q: torch.Tensor | None = None
    packed_o: torch.Tensor | None = None
    packed_q_experts: list[torch.Tensor] | None = None
    packed_o_experts: list[torch.Tensor] | None = None

    @classmethod
    def convert(cls, att: MoA) -> None:
        att.__class__ = cls
        _store_stack_transposed(att.wo)

    def prepack(self) -> None:
        if not worth_packing(self.wq):
            return
        self.packed_q, self.packed_o = pack(self.wq.flatten(0, 1)), pack(self.wo.flatten(0, 1).t())
        if self.router is not None and worth_packing(self.wq[0]):
            self.packed_q_experts = [pack(w) for w in self.wq]
            self.packed_o_experts = [pack(w.t()) for w in self.wo]

    def query(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.packed_q is not None and takes_packed(x_TD):
            return packed_linear(x_TD, self.packed_q)
        return product(x_TD, self.wq.flatten(0, 1))

    def output(self, o_TE: torch.Tensor) -> torch.Tensor:
        if self.packed_o is not None and takes_packed(o_TE):
            return packed_linear(o_TE, self.packed_o)
        return product(o_TE, self.wo.flatten(0, 1).t())

    def sparse(
        self, x_TD: torch.Tensor, routing: Routing, ctx: AttentionContext, kernels: Kernels = AUTO_KERNELS
    ) -> torch.Tensor:
        """With packed weights, ``dsmoe.kernels.cpu.moa_cpu``'s choice on them: many pairs per expert, each
        expert's packed rows (``moa_packed``); fewer, every head through the packed W_q and W_o."""
        if not (kernels.impl in ("auto", "cpu") and ctx.batch_major and takes_packed(x_TD)):
            return super().sparse(x_TD, routing, ctx, kernels)
        if self.packed_q_experts is not None and self.packed_o_experts is not None and loops_experts(routing):
            width = self.wq.shape[1]
            return moa_packed(x_TD, self.packed_q_experts, self.packed_o_experts, width, routing, ctx)
        if self.packed_q is not None:
            return moa_all_heads(x_TD, routing, ctx, self.query, self.output)
        return super().sparse(x_TD, routing, ctx, kernels)


def use_onednn(model: M, prepack: bool = False) -> M:
    """Swap ``model``'s projection modules (a Transformer's, or a module's holding one) for oneDNN ones, in place,
    and return it in eval mode; ``prepack``: also pack every swapped module's weights (see the module's docstring).
    Nothing changes without oneDNN, on another device or dtype than fp32 on the CPU, or in modules already swapped
    (int8 ones included)."""
    first = next(model.parameters(), None)
    if not AVAILABLE or first is None or first.device.type != "cpu" or first.dtype != torch.float32:
        return model
    if prepack and not PACKING:
        raise RuntimeError("this torch build has no oneDNN weight packing (mkldnn._reorder_linear_weight)")
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
    if prepack:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (OneDNNLinear, OneDNNMLPExperts, OneDNNMoA)):
                    module.prepack()
    return model.eval()


def worth_packing(w: torch.Tensor) -> bool:
    """Weights below oneDNN's size floor stay on torch's product (``dsmoe.kernels.onednn.ONEDNN_MIN_WEIGHTS``)."""
    return w.numel() >= onednn.ONEDNN_MIN_WEIGHTS


def uses_onednn(model: nn.Module) -> bool:
    return any(isinstance(m, (OneDNNLinear, OneDNNMLPExperts, OneDNNMoA)) for m in model.modules())


def is_prepacked(model: nn.Module) -> bool:
    return any(
        getattr(m, name, None) is not None
        for m in model.modules()
        for name in ("packed", "packed_in", "packed_q")
    )
