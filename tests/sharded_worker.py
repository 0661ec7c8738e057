"""Run by tests/test_sharded_checkpoints.py, as one process or under torchrun (gloo):

    sharded_worker.py save FOLDER   train 2 steps, write FOLDER/checkpoint, and FOLDER/full.pt with the gathered state
    sharded_worker.py load FOLDER   load FOLDER/checkpoint into a fresh model and optimizer, write FOLDER/loaded.pt

full.pt and loaded.pt hold the full (unsharded) model and optimizer state dicts by parameter name, gathered with
torch's own get_state_dict, so the test compares what was saved with what was loaded on another number of ranks.
"""

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from dsmoe.training import checkpoint as ckpt
from dsmoe.training import sharded
from dsmoe.training.config import TrainConfig
from dsmoe.training.distributed import DistInfo, cleanup, init_distributed
from dsmoe.training.loop import build_model
from dsmoe.training.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_model_dict  # noqa: E402


def model_and_optimizer(info: DistInfo):
    cfg = TrainConfig(
        model=tiny_model_dict(), data="unused", out_dir="unused", dtype="fp32", seed=1, seq_len=16
    )
    model = build_model(cfg, info)
    return cfg, model, build_optimizer(model, cfg)


def train_steps(model, optimizer, info: DistInfo, steps: int = 2) -> None:
    gen = torch.Generator().manual_seed(
        100 + info.rank
    )  # each rank its own batch, as in data-parallel training
    for _ in range(steps):
        x = torch.randint(0, 384, (2, 17), generator=gen)
        model(x[:, :-1], x[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def full_state(model, optimizer) -> dict:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optim_state}


def save(folder: Path, info: DistInfo) -> None:
    cfg, model, optimizer = model_and_optimizer(info)
    train_steps(model, optimizer, info)
    ckpt.write_sharded_checkpoint(
        folder / "checkpoint",
        model,
        optimizer,
        cfg.model_config(),
        trainer_state={"step": 2},
        train_cfg=cfg.to_dict(),
    )
    state = full_state(model, optimizer)
    if info.is_main:
        torch.save(state, folder / "full.pt")


def load(folder: Path, info: DistInfo) -> None:
    _, model, optimizer = model_and_optimizer(info)
    sharded.load_model_and_optimizer(folder / "checkpoint", model, optimizer)
    state = full_state(model, optimizer)
    if info.is_main:
        torch.save(state, folder / "loaded.pt")


if __name__ == "__main__":
    mode, where = sys.argv[1], Path(sys.argv[2])
    dist_info = init_distributed("cpu")
    {"save": save, "load": load}[mode](where, dist_info)
    cleanup()
