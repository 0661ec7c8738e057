"""Sharded model and optimizer state through ``torch.distributed.checkpoint`` (DCP): each rank writes its own shards
and reads only the slices it holds, whatever the number of ranks that wrote them, so a run saved on 2 processes
resumes on 1 and the reverse, and no rank ever holds the full state.

The storage is DCP's Hugging Face safetensors layout (``HuggingFaceStorageWriter(save_distributed=True)``): one
``shard-XXXXX-model-00001-of-00001.safetensors`` file per rank that holds tensors, each tensor's offset in the
full tensor kept as JSON in the file's safetensors header. Loading reads those headers and tensors only. DCP's
default ``FileSystemWriter`` would instead write a ``.metadata`` file that ``FileSystemReader`` reads with
``pickle.load``, and would store non-tensor values that its planner reads with ``torch.load(weights_only=False)``:
either could run code from a crafted checkpoint, so neither is used. The optimizer's non-tensor part, its param
groups (hyperparameters, keyed by parameter name), goes to a JSON file beside its shards instead.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

# torch.distributed.checkpoint is imported where it is used: it adds about a second to the start of every command
# that only reads a single-file checkpoint.

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
PARAM_GROUPS = "optimizer.json"
# DCP warns on each save or load without a process group that it assumes one process: here that is what is meant.
_SINGLE_PROCESS = "torch.distributed is .*assuming the intent is to"


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# Small Python values between the ranks of this run (pickled in memory by torch.distributed, never read from disk).
def broadcast_from_rank0(value: Any) -> Any:
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(value: Any) -> list[Any]:
    """Every rank's ``value`` on rank 0 (an empty list on the others)."""
    if not distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    dist.gather_object(value, out if dist.get_rank() == 0 else None, dst=0)
    return out


def barrier() -> None:
    if distributed():
        dist.barrier()


def _save(state: dict[str, Any], folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    writer = dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        dcp.save(state, storage_writer=writer, no_dist=not distributed())


def _load(state: dict[str, Any], folder: Path, no_dist: bool = False) -> None:
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} holds no safetensors shards")
    import torch.distributed.checkpoint as dcp

    reader = dcp.HuggingFaceStorageReader(str(folder))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        dcp.load(state, storage_reader=reader, no_dist=no_dist or not distributed())


def save_model_and_optimizer(
    root: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any] | None:
    """Write this rank's shards of the model (``root/model``) and optimizer state (``root/optimizer``); collective
    over the process group when there is one. Returns the optimizer's param groups for ``PARAM_GROUPS`` (the
    caller, rank 0, writes that file), None without an optimizer."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    _save(get_model_state_dict(model), root / MODEL_DIR)
    if optimizer is None:
        return None
    optim_state = get_optimizer_state_dict(model, optimizer)
    _save({"state": optim_state["state"]}, root / OPTIMIZER_DIR)
    return {"param_groups": optim_state["param_groups"]}


def write_param_groups(root: Path, param_groups: dict[str, Any]) -> None:
    (root / PARAM_GROUPS).write_text(json.dumps(param_groups, indent=1))


def load_model_and_optimizer(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a checkpoint written by ``save_model_and_optimizer`` on any number of ranks into ``model`` and
    ``optimizer`` as they are sharded now; collective over the process group when there is one."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model_state = get_model_state_dict(model)
    _load(model_state, root / MODEL_DIR)
    set_model_state_dict(model, model_state)
    if optimizer is None:
        return
    # The template: this optimizer's state, created (lazily, by a zero-gradient step at lr 0) when it has none yet.
    template = get_optimizer_state_dict(model, optimizer)
    state = {"state": template["state"]}
    _load(state, root / OPTIMIZER_DIR)
    saved = json.loads((root / PARAM_GROUPS).read_text())["param_groups"]
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": state["state"], "param_groups": _param_groups(saved, cast(list, template["param_groups"]))},
    )


def _param_groups(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The saved param groups with JSON's lists turned back into the tuples the optimizer keeps (``betas``)."""
    if len(saved) != len(current):
        raise ValueError(
            f"the checkpoint has {len(saved)} optimizer param groups, this optimizer {len(current)}"
        )
    return [
        {key: tuple(value) if isinstance(now.get(key), tuple) else value for key, value in group.items()}
        for group, now in zip(saved, current, strict=True)
    ]


def _model_tensors(root: Path) -> dict[str, Any]:
    """The full size and dtype (DCP's TensorStorageMetadata) of every tensor of a sharded checkpoint's model, read
    from the shards' safetensors headers."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = HuggingFaceStorageReader(str(root / MODEL_DIR)).read_metadata()
    return {
        key: meta
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


def full_model_shapes(root: Path) -> dict[str, tuple[int, ...]]:
    """Name -> full shape of every tensor of a sharded checkpoint's model, without reading a tensor."""
    return {key: tuple(meta.size) for key, meta in _model_tensors(root).items()}


def read_full_model_state(root: Path) -> dict[str, torch.Tensor]:
    """The whole model state dict of a sharded checkpoint, in this process alone (no process group needed, none
    used if there is one): what ``load_pretrained``, ``init_from=`` and ``dsmoe export`` read."""
    state: dict[str, Any] = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in _model_tensors(root).items()
    }
    _load(state, root / MODEL_DIR, no_dist=True)
    return state
