"""Sparse expert kernels. ``expert_mlp`` and ``moa`` pick the fastest implementation for the device; every
implementation has the signature of its plain reference in ``reference.py`` and is tested against it."""

from dsmoe.kernels.reference import expert_mlp_reference as expert_mlp
from dsmoe.kernels.reference import moa_reference as moa

__all__ = ["expert_mlp", "moa"]
