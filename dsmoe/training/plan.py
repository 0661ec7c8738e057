"""Memory per rank of a training step, traced: the step the loop runs (model, AdamW, FSDP2, activation
checkpointing, bf16 autocast) is executed on fake tensors (``FakeTensorMode``: shapes, dtypes and storage sizes, no
data) over a fake process group of ``world_size`` ranks, while torch's ``MemTracker``/``FSDPMemTracker`` (a
``TorchDispatchMode``) counts the bytes of every live tensor. The largest micro-batch that fits follows from two traces
(the peak is linear in the micro-batch) and is confirmed by a trace at that size.

Not counted, so left to the headroom: the CUDA context and kernels' workspaces (cuBLAS, flash attention), the caching
allocator's fragmentation, NCCL's buffers, and torch.compile's own memory. The trace runs on the CPU, so it follows
CPU autocast, whose lists of bf16 ops match CUDA's for the ops this model uses (linear, matmul, attention)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from dsmoe.config import ConfigError
from dsmoe.model.transformer import Transformer
from dsmoe.training.config import TrainConfig
from dsmoe.training.distributed import DistInfo, shard_model
from dsmoe.training.optim import build_optimizer
from dsmoe.training.transforms import checkpoint_activations

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

PARTS = ("parameters", "gradients", "optimizer", "gathered", "activations")
# The trackers' categories (MemTracker's and FSDPMemTracker's names), grouped into PARTS.
_GROUPS = {
    "parameters": ("Parameter", "Sharded Param", "Buffer"),
    "gradients": ("Gradient", "Sharded Grad", "Unsharded Grad"),
    "optimizer": ("Optstate", "OptState"),
    "gathered": ("Unsharded Param", "All Gather", "Reduce Scatter"),  # the all-gathered blocks' working set
    "activations": ("Activation", "Temp", "Inputs", "Other"),  # saved activations and backward's temporaries
}


@dataclass(frozen=True)
class StepMemory:
    """Bytes on one rank at the peak of a traced training step, split into PARTS."""

    micro_batch: int
    accumulation: bool  # two micro-batches per step, the first without gradient sync (as the loop does)
    peak: int
    parts: dict[str, int]


def _grouped(snapshot: dict) -> dict[str, int]:
    flat: dict[str, int] = {}
    for per_device in snapshot.values():
        for key, value in per_device.items():
            name = getattr(key, "value", key)
            flat[name] = flat.get(name, 0) + value
    return {part: sum(flat.get(name, 0) for name in names) for part, names in _GROUPS.items()}


def _foreach_transient(model: nn.Module, cfg: TrainConfig) -> int:
    """Extra bytes of AdamW's foreach step (torch's default on CUDA) over the rank's shards: traced on plain tensors of
    the shards' shapes, since DTensor's sharding propagation of foreach ops allocates global-size fake tensors that a
    real step never holds."""
    from torch.distributed._tools.mem_tracker import MemTracker

    shards = nn.ParameterList()
    for p in model.parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            shard = nn.Parameter(torch.empty_like(local))
            shard.grad = torch.empty_like(local)
            shards.append(shard)
    optimizer = build_optimizer(shards, cfg)
    for group in optimizer.param_groups:
        group["foreach"] = True
    optimizer.step()  # allocates the state
    tracker = MemTracker()
    tracker.track_external(shards, optimizer)
    with tracker:
        before = _total(tracker.get_tracker_snapshot())
        optimizer.step()
    return max(_total(tracker.get_tracker_snapshot("peak")) - before, 0)


def _tag_unsharded_grads(tracker: Any, model: nn.Module) -> None:
    """A micro-batch without gradient sync leaves each rank the unsharded gradients of the whole model (FSDP2 keeps
    them in reduce_dtype, fp32, until the step's last micro-batch reduce-scatters them); the tracker saw them made in
    backward and counts them as temporaries, so they are re-labelled as gradients (a private FSDP2/tracker API)."""
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        for fsdp_param in group.fsdp_params if group is not None else ():
            grad = fsdp_param.unsharded_accumulated_grad
            if grad is not None:
                tracker._update_and_maybe_create_winfos(grad, _FSDPRefType.UNSHARDED_GRAD)


def _total(snapshot: dict) -> int:
    return sum(per_device.get("Total", 0) for per_device in snapshot.values())


def _trace(
    cfg: TrainConfig, world_size: int, micro_batch: int, checkpointing: bool, bf16: bool, foreach: bool, mesh
) -> StepMemory:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    model_cfg = cfg.model_config()
    model = Transformer(model_cfg)
    if cfg.trainable == "routers":
        for name, p in model.named_parameters():
            p.requires_grad_(".router." in name)
    if checkpointing:
        checkpoint_activations(model)
    if world_size > 1:
        shard_model(model, DistInfo(0, world_size), torch.bfloat16 if bf16 else None, mesh)
    optimizer = build_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["foreach"] = False  # the foreach step's temporaries are traced apart (_foreach_transient)
    transient = _foreach_transient(model, cfg) if foreach else 0
    accumulation = cfg.global_batch_tokens > micro_batch * cfg.seq_len * world_size
    # Two forward/backward passes in all, as the loop runs them: two micro-batches of one step, or two steps of one,
    # so that the first pass's output (logits) is alive during the second's forward. AdamW's state is made first.
    n_micro, n_steps = (2, 1) if accumulation else (1, 2)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracker: Any
    if world_size > 1:
        tracker = FSDPMemTracker(model, optimizer)
    else:
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
    x = torch.randint(0, model_cfg.vocab_size, (micro_batch, cfg.seq_len))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    before_step: dict[str, int] = {}
    with tracker:
        for _ in range(n_steps):  # the step of training/loop.py
            for micro in range(n_micro):
                if world_size > 1:  # as the loop: reduce-scatter once per step
                    cast("FSDPModule", model).set_requires_gradient_sync(micro == n_micro - 1)
                with autocast:
                    out = model(x, x)
                (out.loss / n_micro).backward()
                if world_size > 1 and micro < n_micro - 1:
                    _tag_unsharded_grads(tracker, model)
                tracker.reset_mod_stats()  # its per-module statistics allow one forward each
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
            before_step = _grouped(tracker.get_tracker_snapshot())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        del out
    peak_parts = _grouped(tracker.get_tracker_snapshot("peak"))
    step_parts = {**before_step, "optimizer": before_step["optimizer"] + transient}
    parts = max(peak_parts, step_parts, key=lambda p: sum(p.values()))
    return StepMemory(micro_batch, accumulation, sum(parts.values()), parts)


def trace_step(
    cfg: TrainConfig,
    world_size: int,
    micro_batch: int,
    checkpointing: bool,
    bf16: bool = True,
    foreach: bool = True,
) -> StepMemory:
    """One rank's memory over training steps of ``micro_batch`` sequences of ``cfg.seq_len`` tokens, FSDP2-sharded
    over ``world_size`` ranks (unsharded for one, as the loop runs it), traced on fake tensors. ``foreach``: AdamW's
    multi-tensor step, torch's default on CUDA (on CPUs it steps one tensor at a time)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if world_size < 1 or micro_batch < 1:
        raise ConfigError(f"need world_size >= 1 and micro_batch >= 1, got {world_size} and {micro_batch}")
    started = False
    if world_size > 1:
        import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
        from torch.distributed.device_mesh import init_device_mesh

        if dist.is_initialized():
            raise ConfigError("dsmoe plan traces on a fake process group of its own: run it outside torchrun")
        dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=world_size)
        started = True
    try:
        mesh = init_device_mesh("cpu", (world_size,)) if world_size > 1 else None
        with FakeTensorMode(allow_non_fake_inputs=True):
            return _trace(cfg, world_size, micro_batch, checkpointing, bf16, foreach, mesh)
    finally:
        if started:
            dist.destroy_process_group()


@dataclass(frozen=True)
class Fit:
    """One setting (activation checkpointing on or off): traced steps and the largest micro-batch within budget."""

    checkpointing: bool
    traced: list[StepMemory]  # micro-batches 1 and 2, then the confirming trace(s)
    per_sequence: int  # bytes the peak grows by per sequence of the micro-batch
    largest_micro_batch: int  # 0: not even one sequence fits
    peak_at_largest: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def valid_micro_batches(cfg: TrainConfig, world_size: int) -> list[int]:
    """Micro-batch sizes the loop accepts: those whose tokens over all ranks divide ``global_batch_tokens``."""
    per_rank = cfg.global_batch_tokens // (cfg.seq_len * world_size)
    return [
        b for b in range(1, per_rank + 1) if cfg.global_batch_tokens % (b * cfg.seq_len * world_size) == 0
    ]


def fit(
    cfg: TrainConfig,
    world_size: int,
    budget: int,
    checkpointing: bool,
    bf16: bool = True,
    report: Callable[[str], None] | None = None,
) -> Fit:
    """Trace micro-batches 1 and 2, extrapolate the (linear) peak to the largest valid micro-batch within
    ``budget`` bytes, and confirm it by tracing that size (stepping down while the trace says it does not fit).
    ``report`` is told of each trace as it starts and how long it took (a large model's take minutes)."""
    sizes = valid_micro_batches(cfg, world_size)
    if not sizes:
        raise ConfigError(
            f"global_batch_tokens={cfg.global_batch_tokens} is less than one sequence of {cfg.seq_len} tokens "
            f"per rank on {world_size} ranks: raise global_batch_tokens"
        )

    def timed(b: int) -> StepMemory:
        started = time.perf_counter()
        if report is not None:
            ac = "on" if checkpointing else "off"
            report(f"tracing a training step at micro-batch {b}, activation checkpointing {ac}...")
        memory = trace_step(cfg, world_size, b, checkpointing, bf16)
        if report is not None:
            report(f"  done in {time.perf_counter() - started:.0f} s")
        return memory

    traced = [timed(b) for b in (1, 2)]
    per_sequence = traced[1].peak - traced[0].peak
    fixed = traced[0].peak - per_sequence
    candidates = [b for b in sizes if fixed + per_sequence * b <= budget]
    while candidates:
        best = candidates.pop()
        known = [m for m in traced if m.micro_batch == best]
        memory = known[0] if known else timed(best)
        if not known:
            traced.append(memory)
        if memory.peak <= budget:
            return Fit(checkpointing, traced, per_sequence, best, memory.peak)
    return Fit(checkpointing, traced, per_sequence, 0, None)


def make_plan(
    cfg: TrainConfig,
    world_size: int,
    gpu_memory_gb: float,
    headroom: float,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Both settings of activation checkpointing on ``world_size`` GPUs of ``gpu_memory_gb`` GB (10^9 bytes),
    ``headroom`` of each kept free for what the trace does not count; bytes throughout. ``report``: see ``fit``."""
    if gpu_memory_gb <= 0 or not 0 <= headroom < 1:
        raise ConfigError(f"need gpu_memory_gb > 0 and 0 <= headroom < 1, got {gpu_memory_gb} and {headroom}")
    budget = int(gpu_memory_gb * 1e9 * (1 - headroom))
    bf16 = cfg.dtype != "fp32"
    model_cfg = cfg.model_config()
    return {
        "model": model_cfg.to_dict(),
        "total_params": model_cfg.total_params,
        "world_size": world_size,
        "gpu_memory_gb": gpu_memory_gb,
        "headroom": headroom,
        "budget_bytes": budget,
        "seq_len": cfg.seq_len,
        "global_batch_tokens": cfg.global_batch_tokens,
        "dtype": "bf16" if bf16 else "fp32",
        "sharding": "FSDP2 full sharding, one unit per block" if world_size > 1 else "none (one rank)",
        "settings": [fit(cfg, world_size, budget, ac, bf16, report).to_dict() for ac in (False, True)],
    }
