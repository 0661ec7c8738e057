"""What training applies to the one model, from outside and in torchtitan's order: activation checkpointing, then
torch.compile, then FSDP2 (compiling a block that FSDP already wraps would trace its hooks, and checkpointing a
compiled block would recompute a graph the compiler cannot see into)."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from dsmoe.model.transformer import Transformer
from dsmoe.training.distributed import DistInfo, shard_model


def checkpoint_activations(model: Transformer) -> Transformer:
    """Recompute each block in backward instead of keeping its activations (non-reentrant checkpointing). Only the
    blocks' forward changes: parameter names, and so checkpoints, stay the same."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)  # type: ignore[method-assign]
    return model


def compile_blocks(model: Transformer) -> Transformer:
    """torch.compile each block (one graph per block, reused by all: they share their code and shapes)."""
    for block in model.blocks:
        block.compile()
    return model


def apply_transforms(
    model: Transformer,
    info: DistInfo,
    *,
    activation_checkpointing: bool,
    compile: bool,
    param_dtype: torch.dtype | None = None,
) -> Transformer:
    """Activation checkpointing, then compile, then FSDP2 over the ranks of ``info`` (when there are several)."""
    if activation_checkpointing:
        checkpoint_activations(model)
    if compile:
        compile_blocks(model)
    if info.world_size > 1:
        shard_model(model, info, param_dtype)
    return model
