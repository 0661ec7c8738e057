"""Weight-only int8 for inference: a transform applied to the model once, like ``sparsify``.

Every weight that multiplies activations (attention query, key, value and output projections; MLP experts; an untied
LM head) is stored as int8 with one scale per output channel (symmetric, absmax / 127) and read back through a
parametrization, so every path, every sparse strategy and the reference included, sees the dequantized weight and
gives the same result. Speed comes in the compiled decode step: there, products of a few rows read the int8 values
directly (``dsmoe.model.products``, ``dsmoe.kernels.gathered``), and MoE decode reads only the selected experts' int8
rows. Eager, each use dequantizes the whole weight: correct and slower than fp32, so decoding an int8 model compiles.

Kept in full precision: routers (their probabilities are compared against thresholds), norms, and the embedding
table (a lookup reads one row per token; a tied LM head shares it). The stored weights are int8 and the model is
for inference: training or saving a quantized model is refused.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from dsmoe.inference.arguments import QUANTIZATIONS

M = TypeVar("M", bound=nn.Module)

# The dimension each weight is contracted over (its input); scales are per output channel, over the rest. Keyed by
# class name, so that the copies of these classes in an exported folder's modelling file (loaded by `dsmoe serve`
# through the Hugging Face wrapper) are found too.
_CONTRACTED = {
    "MLPExperts": {"w_in": -1, "w_out": -2},
    "MoA": {"wq": -1, "wo": -2, "wk.weight": -1, "wv.weight": -1},
    "Transformer": {"lm_head.weight": -1},
}


class Int8Dequantize(nn.Module):
    """The parametrization: int8 values times their scales (the model's float dtype, broadcast). ``transposed``: the
    values are stored with their last two dims swapped, so that the contracted dim is the contiguous one, and are
    read back as a transposed view."""

    scale: torch.Tensor

    def __init__(self, scale: torch.Tensor, transposed: bool):
        super().__init__()
        self.register_buffer("scale", scale)
        self.transposed = transposed

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        w = q.to(self.scale.dtype) * self.scale
        return w.transpose(-1, -2) if self.transposed else w


def int8_values(w: torch.Tensor, contracted: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, scales) of ``w``: symmetric, one scale per output channel (all but the contracted dim)."""
    scale = w.detach().abs().amax(dim=contracted, keepdim=True).float().clamp(min=1e-12) / 127
    q = torch.round(w.detach().float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


def quantize_weight(module: nn.Module, name: str, contracted: int) -> None:
    """Store ``module.<name>`` as int8 values with the contracted dim innermost: the broadcast products then sum
    along contiguous int8 rows, not down strided columns (1.96x against 1.25x fp32's batch-1 decode for Dense,
    benchmarks/int8.md)."""
    w = getattr(module, name)
    transposed = contracted == -2
    q, scale = int8_values(w.transpose(-1, -2) if transposed else w, -1)
    delattr(module, name)
    module.register_parameter(name, nn.Parameter(q.contiguous(), requires_grad=False))
    parametrize.register_parametrization(module, name, Int8Dequantize(scale, transposed), unsafe=True)


def quantized_weights(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """(module, weight name, contracted dim) of every weight ``quantize`` stores as int8."""
    found = []
    for module in model.modules():
        kind = type(module).__name__.removeprefix("Parametrized")  # parametrize renames a module's class
        for path, dim in _CONTRACTED.get(kind, {}).items():
            *owner_path, name = path.split(".")
            owner: nn.Module | None = module
            for part in owner_path:  # lm_head is None when tied to the embedding
                owner = getattr(owner, part, None)
            if owner is not None:
                found.append((owner, name, dim))
    return found


def quantize(model: M, method: str = "int8") -> M:
    """Store the projection weights of ``model`` (a Transformer, or a module holding one, such as the Hugging Face
    wrapper) as ``method`` ('int8'; 'none' leaves it as it is), in place, and return it in eval mode."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantize {method!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if method == "none":
        return model
    if is_quantized(model):
        raise ValueError("the model is already quantized")
    for module, name, dim in quantized_weights(model):
        quantize_weight(module, name, dim)
    return model.eval().requires_grad_(False)


def is_quantized(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())
