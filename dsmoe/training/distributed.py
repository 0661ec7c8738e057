"""Process-group set-up for torchrun, and FSDP2 sharding (``fully_shard`` per block, then the root)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from dsmoe.model.transformer import Transformer


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment; start the process group when there is more than one process."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA GPU is visible; use device=cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


def shard_model(
    model: Transformer, info: DistInfo, param_dtype: torch.dtype | None, mesh: DeviceMesh | None = None
) -> Transformer:
    """FSDP2: each block is one all-gather unit; the root takes the embeddings and the head. ``mesh``: one made
    beforehand (dsmoe.training.plan shards fake tensors, and a mesh cannot be made under FakeTensorMode)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = mesh or init_device_mesh(info.device.type, (info.world_size,))
    # Mixed precision through FSDP on GPUs; on CPUs autocast does it (gloo reduces in the parameters' dtype).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs: dict[str, Any] = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / info.world_size
    return values


def load_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state, optim_state, info: DistInfo
) -> None:
    """Load full (unsharded) state dicts, as single-file checkpoints hold them, into a model sharded or not."""
    if info.world_size == 1:
        model.load_state_dict(model_state)
        if optimizer is not None and optim_state is not None:
            optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=model_state,
        optim_state_dict=optim_state if optim_state is not None else {},
        options=opts,
    )


def cleanup(wait_for_all: bool = False) -> None:
    """Leave the process group. ``wait_for_all`` (a run that finished): first a barrier, so that no process tears
    down its connections while another still uses them (once in CI a gloo process aborted at exit without it)."""
    if dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()
