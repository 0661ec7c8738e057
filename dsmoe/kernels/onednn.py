"""``x @ w^T`` on the CPU through oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, the product that
inductor's frozen CPU graphs use), where it is faster than torch's default fp32 product (MKL's sgemm/sgemv).

On a 2-core AMD EPYC (Zen 4, 2 threads; benchmarks/cpu_products.md) oneDNN multiplies 1-16 rows by weights of 512K
values and more 1.2-3.5x faster than MKL, and 64-256 rows 1.1-1.7x faster. Each call costs ~35 us of setup against
~2 for MKL, so small weights stay on MKL (ONEDNN_MIN_WEIGHTS); bf16 products already go through oneDNN in torch.

The op is a custom op for one reason: inductor lowers ``mkldnn._linear_pointwise`` only for frozen, constant
weights, so a compiled graph over a model's (non-constant) weights calls it as an opaque op. It has no backward:
``fast_linear`` takes it only where no gradient is needed.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

# The ops of dsmoe.kernels live in the "dsmoe" namespace; a copy of this code bundled into an exported Hugging Face
# folder (loaded under another module name, perhaps beside dsmoe itself) registers its own namespace instead of
# colliding.
OP_NAMESPACE = "dsmoe" if __name__.startswith("dsmoe.") else "dsmoe_" + re.sub(r"\W", "_", __name__)

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
PACKING = AVAILABLE and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")

# oneDNN's faster read outweighs its per-call setup (~35 us, against ~2 for MKL) from this many weight values with
# several rows, and from twice as many with one: at one row [256, 1024] is 0.80x MKL and [512, 2048] 1.17x; from 4
# rows [256, 1024] is 1.36-1.56x (benchmarks/cpu_products.md).
ONEDNN_MIN_WEIGHTS = 1 << 18


@torch.library.custom_op(f"{OP_NAMESPACE}::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, w_MK: torch.Tensor) -> torch.Tensor:
    """x [..., K] times w^T, w [M, K] contiguous -> [..., M], by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, w_MK, None, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_fake(x, w_MK):
    return x.new_empty(*x.shape[:-1], w_MK.shape[0])


def onednn_suits(x: torch.Tensor, w_MK: torch.Tensor) -> bool:
    """Whether ``x @ w^T`` is faster through oneDNN: fp32 on the CPU, no gradient, a large contiguous weight
    (oneDNN reorders a strided one on every call: ~40x slower than MKL; it takes no transposed one)."""
    return (
        AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == w_MK.dtype == torch.float32
        and w_MK.dim() == 2
        and w_MK.is_contiguous()
        and w_MK.numel() >= ONEDNN_MIN_WEIGHTS * (2 if x.numel() == x.shape[-1] else 1)
        and not (torch.is_grad_enabled() and (x.requires_grad or w_MK.requires_grad))
    )


def fast_linear(x: torch.Tensor, w_MK: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias), through oneDNN where ``onednn_suits`` says it is faster."""
    return onednn_linear(x, w_MK) if onednn_suits(x, w_MK) else F.linear(x, w_MK)


# The rows oneDNN lays a packed weight out for. Packed for 8 rows, the 1B shapes' weights multiply 4-16 rows 1.4-1.9x
# faster than unpacked, 64 rows 1.1-1.2x and 256 rows 1.02x, but one row 0.7-1.2x: one row keeps the plain weight
# (benchmarks/cpu_products.md, "onednn packed").
PACK_ROWS = 8


def pack(w_MK: torch.Tensor) -> torch.Tensor:
    """``w`` [M, K] reordered once into oneDNN's blocked layout for ``packed_linear``: what inductor's frozen CPU
    graphs do to constant weights. The result is an opaque ``mkldnn`` tensor: it cannot be sliced, saved, moved or
    traced, and it is a second copy of the weight's values."""
    return torch.ops.mkldnn._reorder_linear_weight(w_MK.detach().contiguous(), PACK_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ w^T`` for a weight packed by ``pack`` (fp32, no gradient, eager only)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
