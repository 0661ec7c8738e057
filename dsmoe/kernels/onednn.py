"""``x @ w^T`` on the CPU through oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, the product that
inductor's frozen CPU graphs use), where it is faster than torch's default fp32 product (MKL's sgemm/sgemv).

On a 2-core AMD EPYC (Zen 4, 2 threads; benchmarks/cpu_products.md) oneDNN reads a weight matrix at ~40 GB/s in a
one-row product, where MKL's matrix-vector product reads ~17, and multiplies 4-16 rows 1.6-3.3x faster than MKL; at
hundreds of rows it is still ~1.4x faster. Each call costs ~35 us of setup against ~2 for MKL, so weights smaller
than ONEDNN_MIN_WEIGHTS values stay on MKL; bf16 products already go through oneDNN in torch.

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

# From this many weight values (1 MiB of fp32) up, oneDNN's faster read outweighs its per-call setup (~35 us): at a
# [256, 1024] weight and 1 row the two are level (benchmarks/cpu_products.md).
ONEDNN_MIN_WEIGHTS = 1 << 18


@torch.library.custom_op(f"{OP_NAMESPACE}::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, w_MK: torch.Tensor) -> torch.Tensor:
    """x [..., K] times w^T, w [M, K] with contiguous rows -> [..., M], by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, w_MK, None, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_fake(x, w_MK):
    return x.new_empty(*x.shape[:-1], w_MK.shape[0])


def onednn_suits(x: torch.Tensor, w_MK: torch.Tensor) -> bool:
    """Whether ``x @ w^T`` is faster through oneDNN: fp32 on the CPU, no gradient, a large weight whose rows are
    contiguous (oneDNN takes no transposed weight)."""
    return (
        AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == w_MK.dtype == torch.float32
        and w_MK.dim() == 2
        and w_MK.stride(1) == 1
        and w_MK.numel() >= ONEDNN_MIN_WEIGHTS
        and not (torch.is_grad_enabled() and (x.requires_grad or w_MK.requires_grad))
    )


def fast_linear(x: torch.Tensor, w_MK: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias), through oneDNN where ``onednn_suits`` says it is faster."""
    return onednn_linear(x, w_MK) if onednn_suits(x, w_MK) else F.linear(x, w_MK)
