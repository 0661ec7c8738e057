"""Sharded checkpoints (torch.distributed.checkpoint): each rank writes its own shards, a checkpoint saved on 2 gloo
processes loads on 1 and the reverse with every model and optimizer value bit for bit, runs resumed on another
number of processes equal the uninterrupted run, and single-file checkpoints from before still resume exactly."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import prepared_data, run_train, train_cli_args
from safetensors import safe_open
from sharded_worker import full_state, model_and_optimizer, train_steps
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from dsmoe.cli import main
from dsmoe.training import checkpoint as ckpt
from dsmoe.training import sharded
from dsmoe.training.distributed import DistInfo
from dsmoe.training.resume import saved_train_values

WORKER = Path(__file__).parent / "sharded_worker.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_data(tmp_path_factory.mktemp("corpus"))


def worker(mode: str, folder: Path, nproc: int) -> None:
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [*launch, *([] if launch else [sys.executable]), str(WORKER), mode, str(folder)]
    proc = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_bitwise_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_saved_on_two_processes_each_writes_its_shards_and_one_process_loads_them_bit_for_bit(tmp_path):
    worker("save", tmp_path, nproc=2)
    saved = tmp_path / "checkpoint"
    ckpt.verify_checkpoint(saved)
    for part in (sharded.MODEL_DIR, sharded.OPTIMIZER_DIR):  # rank r wrote shard r+1: half of every parameter
        files = sorted((saved / part).glob("*.safetensors"))
        assert [f.name[:11] for f in files] == ["shard-00001", "shard-00002"]
        with safe_open(files[0], "pt") as f:
            embed = f.get_slice(
                "embed.weight" if part == "model" else "state.embed.weight.exp_avg"
            ).get_shape()
        assert embed == [192, 32]  # of the full [384, 32]
    _, model, optimizer = model_and_optimizer(DistInfo())
    sharded.load_model_and_optimizer(saved, model, optimizer)
    assert_bitwise_equal(torch.load(tmp_path / "full.pt", weights_only=True), full_state(model, optimizer))
    assert_bitwise_equal(
        ckpt.load_model_state(saved), model.state_dict()
    )  # what load_pretrained / export read


def test_saved_on_one_process_loads_bit_for_bit_on_two(tmp_path):
    info = DistInfo()
    cfg, model, optimizer = model_and_optimizer(info)
    train_steps(model, optimizer, info)
    ckpt.write_sharded_checkpoint(
        tmp_path / "checkpoint",
        model,
        optimizer,
        cfg.model_config(),
        trainer_state={},
        train_cfg=cfg.to_dict(),
    )
    worker("load", tmp_path, nproc=2)
    assert_bitwise_equal(full_state(model, optimizer), torch.load(tmp_path / "loaded.pt", weights_only=True))


def test_loading_restores_the_optimizer_hyperparameters_from_json(tmp_path):
    info = DistInfo()
    cfg, model, optimizer = model_and_optimizer(info)
    train_steps(model, optimizer, info, steps=1)
    ckpt.write_sharded_checkpoint(
        tmp_path / "c", model, optimizer, cfg.model_config(), trainer_state={}, train_cfg=cfg.to_dict()
    )
    _, fresh, fresh_optimizer = model_and_optimizer(info)
    for group in fresh_optimizer.param_groups:
        group["lr"] = 123.0
    sharded.load_model_and_optimizer(tmp_path / "c", fresh, fresh_optimizer)
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert fresh_optimizer.param_groups[0]["betas"] == (
        cfg.beta1,
        cfg.beta2,
    )  # a tuple again, as AdamW keeps it
    assert_bitwise_equal(
        get_optimizer_state_dict(model, optimizer), get_optimizer_state_dict(fresh, fresh_optimizer)
    )


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_weights(out_dir):
    return ckpt.load_model_state(ckpt.list_checkpoints(out_dir)[-1])


def test_resumed_on_two_processes_equals_the_uninterrupted_run(data_dir, tmp_path):
    args = train_cli_args(data_dir, tmp_path / "two", total_steps=6)
    run_train(args, nproc=2)
    pieces = train_cli_args(data_dir, tmp_path / "pieces", total_steps=6)
    run_train([*pieces, "--max-steps", "3"], nproc=2)  # stops off the checkpoint grid
    run_train(["--resume", f"out_dir={tmp_path / 'pieces'}"], nproc=2)
    assert losses(tmp_path / "pieces") == losses(tmp_path / "two")
    assert_bitwise_equal(final_weights(tmp_path / "two"), final_weights(tmp_path / "pieces"))


def test_resumed_on_another_number_of_processes_equals_the_uninterrupted_run(data_dir, tmp_path):
    """2 processes for steps 1-2, 1 for steps 3-4, 2 again for 5-6, against one process throughout. With the same
    micro_batch_size, 1 process with 2 micro-batches of gradient accumulation computes what 2 processes with 1 each
    do, bit for bit, except the gradient norm (summed over the shards in another order): clipping is off here so
    that any difference would come from the checkpoints. With clipping on, the 1- and 2-process runs themselves
    differ by about 1e-7."""
    run = [*train_cli_args(data_dir, tmp_path / "one", total_steps=6), "grad_clip=1e9"]
    run_train(run)
    switched = [*train_cli_args(data_dir, tmp_path / "switched", total_steps=6), "grad_clip=1e9"]
    run_train([*switched, "--max-steps", "2"], nproc=2)
    run_train(["--resume", f"out_dir={tmp_path / 'switched'}", "--max-steps", "2"])
    run_train(["--resume", f"out_dir={tmp_path / 'switched'}"], nproc=2)
    assert losses(tmp_path / "switched") == losses(tmp_path / "one")
    assert_bitwise_equal(final_weights(tmp_path / "one"), final_weights(tmp_path / "switched"))


def test_single_file_checkpoints_from_before_still_resume_exactly(data_dir, tmp_path, capsys):
    """A checkpoint in the layout training wrote before sharding (model.safetensors, optimizer.pt)."""
    full = tmp_path / "full"
    assert main(["train", *train_cli_args(data_dir, full, total_steps=4)]) == 0
    old = tmp_path / "old"
    assert main(["train", *train_cli_args(data_dir, old, total_steps=4), "--max-steps", "2"]) == 0
    new = ckpt.list_checkpoints(old)[-1]
    info = DistInfo()
    _, model, optimizer = model_and_optimizer(info)
    sharded.load_model_and_optimizer(new, model, optimizer)
    as_before = new.with_name(new.name + ".single")
    ckpt.write_checkpoint(
        as_before,
        model.state_dict(),
        ckpt.read_model_config(new),
        optimizer_state=optimizer.state_dict(),
        trainer_state=ckpt.load_state(new / "trainer.pt"),
        train_cfg=saved_train_values(new),
        tokenizer_file=new / "tokenizer.json",
    )
    ckpt._discard(new)
    as_before.rename(new)
    assert (new / "model.safetensors").is_file() and not ckpt.is_sharded(new)
    assert main(["train", "--resume", f"out_dir={old}"]) == 0
    assert losses(old) == losses(full)
    assert_bitwise_equal(final_weights(full), final_weights(old))
    assert ckpt.is_sharded(ckpt.list_checkpoints(old)[-1])  # the resumed run writes the sharded layout


def test_export_and_load_pretrained_read_a_checkpoint_written_by_two_processes(data_dir, tmp_path):
    run_train(train_cli_args(data_dir, tmp_path / "run", total_steps=2), nproc=2)
    checkpoint = ckpt.list_checkpoints(tmp_path / "run")[-1]
    model, tokenizer = ckpt.load_pretrained(checkpoint)
    assert tokenizer is not None
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "hf" / "model.safetensors")
    native = model.state_dict()
    assert len(exported) == len(native)
    for name, tensor in native.items():
        (match,) = [v for k, v in exported.items() if k.endswith(name)]
        assert torch.equal(match, tensor), name


def test_a_checkpoint_missing_a_shard_is_refused(data_dir, tmp_path):
    assert main(["train", *train_cli_args(data_dir, tmp_path / "run", total_steps=2)]) == 0
    checkpoint = ckpt.list_checkpoints(tmp_path / "run")[-1]
    (shard,) = (checkpoint / "optimizer").glob("*.safetensors")
    shard.unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint file {shard} is missing"):
        ckpt.load_pretrained(checkpoint)


def test_loading_a_sharded_checkpoint_unpickles_nothing(data_dir, tmp_path):
    """DCP's default reader would pickle.load a ``.metadata`` file; ours reads safetensors headers only, so a
    payload planted where that file would be is never run."""
    from test_reliability import _Payload

    assert main(["train", *train_cli_args(data_dir, tmp_path / "run", total_steps=2)]) == 0
    checkpoint = ckpt.list_checkpoints(tmp_path / "run")[-1]
    marker = tmp_path / "payload-ran"
    for part in (sharded.MODEL_DIR, sharded.OPTIMIZER_DIR):
        (checkpoint / part / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    ckpt.load_pretrained(checkpoint)
    assert main(["train", "--resume", f"out_dir={tmp_path / 'run'}", "total_tokens=768"]) == 0
    assert not marker.exists()
