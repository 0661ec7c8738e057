"""Products of activations with a module's weight, written so that int8 weights (``dsmoe.inference.quantize``) are
read as int8 where that is faster.

A quantized weight is a parametrization: reading ``module.<name>`` dequantizes it. Eager, that makes a full-precision
copy on every use (correct, not fast). In a compiled graph, a product of a few rows with a quantized weight is
written as a broadcast multiply and a sum, and inductor fuses the dequantization into that one reduction, which reads
the int8 values: 2.1x the fp32 product's speed at one row of [1, 1024] x [1024, 5632] on a 2-core Xeon, where
PyTorch's own int8 CPU kernel (``_weight_int8pack_mm``) is 3.4x slower than fp32; batch-1 decode of a whole model,
1.96x (``benchmarks/int8.md``). Unquantized weights and larger batches take the ordinary product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

# The most rows for which the broadcast form beats dequantizing: 2.1x faster than fp32 at 1 row, 1.6x slower at 16
# (benchmarks/int8.md).
MUL_SUM_MAX_ROWS = 4


def is_quantized(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is stored quantized (read through a parametrization)."""
    return parametrize.is_parametrized(module, name)


def _reads_int8(module: nn.Module, name: str, rows: int) -> bool:
    return rows <= MUL_SUM_MAX_ROWS and torch.compiler.is_compiling() and is_quantized(module, name)


def times_rows(x: torch.Tensor, module: nn.Module, name: str) -> torch.Tensor:
    """x [..., K] times the weight's rows: x W^T, the weight [..., M, K] flattened to [M', K] (``F.linear``)."""
    w = getattr(module, name)
    w_MK = w.reshape(-1, w.shape[-1])
    x_TK = x.reshape(-1, x.shape[-1])
    if _reads_int8(module, name, x_TK.shape[0]):
        return (x_TK[:, None, :] * w_MK[None]).sum(-1).view(*x.shape[:-1], -1)
    return F.linear(x, w_MK)


def times(x_TK: torch.Tensor, module: nn.Module, name: str) -> torch.Tensor:
    """x [T, K] times the weight [..., M] flattened to [K, M]: x W."""
    w = getattr(module, name)
    w_KM = w.reshape(-1, w.shape[-1])
    if _reads_int8(module, name, x_TK.shape[0]):
        return (x_TK[:, :, None] * w_KM[None]).sum(1)
    return x_TK @ w_KM
