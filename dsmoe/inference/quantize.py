"""Weight-only int8 for inference, as a module swap in gpt-fast's style: the modules that hold projection weights are
replaced by int8 versions that compute their own products, so the model code never knows.

* ``nn.Linear`` (attention keys and values, an untied LM head) -> ``Int8Linear``;
* ``MLPExperts`` -> ``Int8MLPExperts``, ``MoA`` -> ``Int8MoA``: the same modules, whose products (``up``/``down``,
  ``query``/``output``, the selected experts' weights) read int8 values. These two are converted in place, as
  ``torch.nn.utils.parametrize`` converts a module: their weights are stacked expert tensors that keep their names
  (``w_in``, ``wq``, ...) in every saved file, so they cannot become child modules.

Every weight is stored as int8 with one scale per output channel (symmetric, absmax / 127), the contracted dim
innermost: a product of a few rows is a broadcast multiply and sum that, in a compiled graph, inductor fuses with the
dequantization into one reduction over contiguous int8 rows (2.1x the fp32 product's speed at one row of
[1, 1024] x [1024, 5632] on a 2-core Xeon, where PyTorch's own int8 CPU kernel, ``_weight_int8pack_mm``, is 3.4x
slower than fp32; benchmarks/int8.md). MoE decode multiplies only the selected experts' int8 rows. Larger batches
dequantize and take the ordinary product. Eager, each product dequantizes its weight: correct, slower than fp32, so
decoding an int8 model compiles.

Kept in full precision: routers (their probabilities are compared against thresholds), norms, and the embedding table
(a lookup reads one row per token; a tied LM head shares it). The model is for inference: training or saving a
quantized model is refused.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.inference.arguments import QUANTIZATIONS
from dsmoe.kernels import expert_mlp
from dsmoe.kernels.reference import activate
from dsmoe.model.attention import MoA
from dsmoe.model.experts import MLPExperts
from dsmoe.model.routing import Routing
from dsmoe.model.settings import AUTO_KERNELS, Kernels

M = TypeVar("M", bound=nn.Module)

# The CPUs (torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY overrides) whose int8 products beat
# fp32's at batch 1: with AVX-512, SmolLM2-135M's compiled int8 decode is 1.62-1.71x (Dense) and 1.44-1.52x (DS-MoE)
# the fp32 compiled decode (benchmarks/llamacpp/, Zen 4); with AVX2 only it ran at 0.32x and 0.66x of fp32 (issue #33, an
# AVX2 EPYC), so int8 there would only slow decoding down, and ``int8_pays`` says no.
INT8_CPU_CAPABILITIES = ("AVX512",)


def int8_pays(device: str | torch.device = "cpu") -> bool:
    """Whether int8 weights decode faster than fp32 ones on ``device`` (on a CPU: by INT8_CPU_CAPABILITIES)."""
    if torch.device(device).type != "cpu":
        return True
    return torch.backends.cpu.get_cpu_capability() in INT8_CPU_CAPABILITIES


# The most rows for which the broadcast product beats dequantizing: 2.1x faster than fp32 at 1 row, 1.6x slower at
# 16 (benchmarks/int8.md).
MUL_SUM_MAX_ROWS = 4


def int8_values(w: torch.Tensor, contracted: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, scales) of ``w``: symmetric, one scale per output channel (all but the contracted dim)."""
    scale = w.detach().abs().amax(dim=contracted, keepdim=True).float().clamp(min=1e-12) / 127
    q = torch.round(w.detach().float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


def times_rows(x: torch.Tensor, q_MK: torch.Tensor, scale_M1: torch.Tensor) -> torch.Tensor:
    """x [..., K] times W^T, W = q * scale [M, K] (int8 rows, each with its scale) -> [..., M]."""
    w_MK = q_MK.to(x.dtype) * scale_M1
    x_TK = x.reshape(-1, x.shape[-1])
    if x_TK.shape[0] <= MUL_SUM_MAX_ROWS:
        return (x_TK[:, None, :] * w_MK[None]).sum(-1).view(*x.shape[:-1], -1)
    return F.linear(x, w_MK)


def times_stacked(h_TK: torch.Tensor, q_NDF: torch.Tensor, scale_ND1: torch.Tensor) -> torch.Tensor:
    """h [T, N*F] times the experts' stacked [N*F, D] weight, stored as int8 [N, D, F] (the contracted F innermost)
    -> [T, D]."""
    n, d, f = q_NDF.shape
    w_NDF = q_NDF.to(h_TK.dtype) * scale_ND1
    if h_TK.shape[0] <= MUL_SUM_MAX_ROWS:
        return (h_TK.view(-1, n, 1, f) * w_NDF[None]).sum((1, 3))
    return h_TK @ w_NDF.transpose(1, 2).reshape(n * f, d)


class Int8Linear(nn.Module):
    """``nn.Linear`` without bias, weight-only int8 (gpt-fast's WeightOnlyInt8Linear)."""

    weight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = int8_values(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return times_rows(x, self.weight, self.scale)


def _store(module: nn.Module, name: str, w: torch.Tensor, transposed: bool) -> None:
    """Replace parameter ``name`` by int8 buffers ``{name}_int8`` and ``{name}_scale``; ``transposed``: the last two
    dims are swapped first, so that the contracted dim is innermost."""
    q, scale = int8_values(w.transpose(-1, -2) if transposed else w)
    delattr(module, name)
    module.register_buffer(f"{name}_int8", q.contiguous())
    module.register_buffer(f"{name}_scale", scale)


def _convert(module: nn.Module, cls: type, rows: str, columns: str) -> None:
    """Turn ``module`` into ``cls`` in place (as parametrize turns a module into its parametrized class): weight
    ``rows`` stored as int8 as it is, weight ``columns`` transposed first (the contracted dim innermost in both)."""
    w_rows, w_columns = getattr(module, rows), getattr(module, columns)
    module.__class__ = cls
    _store(module, rows, w_rows, transposed=False)
    _store(module, columns, w_columns, transposed=True)


def _dequantized(module: nn.Module, name: str, transposed: bool) -> torch.Tensor:
    q, scale = getattr(module, f"{name}_int8"), getattr(module, f"{name}_scale")
    w = q.to(scale.dtype) * scale
    return w.transpose(-1, -2) if transposed else w


class Int8MLPExperts(MLPExperts):
    """MLPExperts with int8 weights: ``w_in`` [N, F_in, D] as is, ``w_out`` stored [N, D, F]."""

    w_in_int8: torch.Tensor
    w_in_scale: torch.Tensor
    w_out_int8: torch.Tensor
    w_out_scale: torch.Tensor

    @classmethod
    def convert(cls, experts: MLPExperts) -> None:
        _convert(experts, cls, "w_in", "w_out")

    @property
    def w_in(self) -> torch.Tensor:  # type: ignore[override]
        return _dequantized(self, "w_in", transposed=False)

    @property
    def w_out(self) -> torch.Tensor:  # type: ignore[override]
        return _dequantized(self, "w_out", transposed=True)

    def up(self, x_TD: torch.Tensor) -> torch.Tensor:
        return times_rows(x_TD, self.w_in_int8.flatten(0, 1), self.w_in_scale.flatten(0, 1))

    def down(self, h_TK: torch.Tensor) -> torch.Tensor:
        return times_stacked(h_TK, self.w_out_int8, self.w_out_scale)

    def sparse(self, x_TD: torch.Tensor, routing: Routing, kernels: Kernels = AUTO_KERNELS) -> torch.Tensor:
        """A few tokens (no more (token, expert) slots than experts: decode): each slot's expert rows gathered as
        int8 and multiplied in one reduction, unselected slots of a threshold routing at weight zero; more tokens:
        the dequantized weights through the kernels."""
        if routing.indices.numel() > self.n_experts:
            return expert_mlp(x_TD, self.w_in, self.w_out, routing, self.activation, kernels)
        dtype, e = x_TD.dtype, routing.indices
        weight_TK = torch.where(routing.mask, routing.weights, 0).to(dtype)
        w_in_TKFD = self.w_in_int8[e].to(dtype) * self.w_in_scale[e]
        h_TKF = activate((w_in_TKFD * x_TD[:, None, None, :]).sum(-1), self.activation) * weight_TK[..., None]
        w_out_TKDF = self.w_out_int8[e].to(dtype) * self.w_out_scale[e]
        return (h_TKF[:, :, None, :] * w_out_TKDF).sum((1, 3))


class Int8MoA(MoA):
    """MoA with int8 expert rows: ``wq`` [N, E, D] as is, ``wo`` stored [N, D, E]."""

    wq_int8: torch.Tensor
    wq_scale: torch.Tensor
    wo_int8: torch.Tensor
    wo_scale: torch.Tensor

    @classmethod
    def convert(cls, att: MoA) -> None:
        _convert(att, cls, "wq", "wo")

    def query(self, x_TD: torch.Tensor) -> torch.Tensor:
        return times_rows(x_TD, self.wq_int8.flatten(0, 1), self.wq_scale.flatten(0, 1))

    def output(self, o_TE: torch.Tensor) -> torch.Tensor:
        return times_stacked(o_TE, self.wo_int8, self.wo_scale)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _dequantized(self, "wq", transposed=False), _dequantized(self, "wo", transposed=True)


def quantize(model: M, method: str = "int8") -> M:
    """Swap the projection weights of ``model`` (a Transformer, or a module holding one, such as the Hugging Face
    wrapper) for ``method`` ('int8'; 'none' leaves it as it is), in place, and return it in eval mode."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantize {method!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if method == "none":
        return model
    if is_quantized(model):
        raise ValueError("the model is already quantized")
    for module in list(model.modules()):
        # by class name, so that the copies of these classes in an exported folder's modelling file are found too
        kind = type(module).__name__
        if kind == "MLPExperts":
            Int8MLPExperts.convert(module)  # type: ignore[arg-type]
        elif kind == "MoA":
            Int8MoA.convert(module)  # type: ignore[arg-type]
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child))
    return model.eval().requires_grad_(False)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8MLPExperts, Int8MoA)) for m in model.modules())
