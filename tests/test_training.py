"""Training: exact resume, checkpoints, config handling, data-parallel agreement."""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from helpers import model_file, prepared_data, run_train, small_config, tiny_model_dict, tiny_train_config

from dsmoe.config import ConfigError
from dsmoe.model.transformer import Transformer
from dsmoe.training import checkpoint as ckpt
from dsmoe.training.config import load_train_config
from dsmoe.training.loop import train
from dsmoe.training.optim import lr_at


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_data(tmp_path_factory.mktemp("corpus"))


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_weights(out_dir):
    return ckpt.load_model_state(ckpt.list_checkpoints(out_dir)[-1])


@pytest.mark.parametrize("regime", ["dsmoe", "smoe"])
def test_resumed_run_equals_uninterrupted_run(data_dir, tmp_path, regime):
    full = tiny_train_config(data_dir, tmp_path / "full", regime)
    train(full)
    pieces = tiny_train_config(data_dir, tmp_path / "pieces", regime)
    train(pieces, max_steps=3)  # stops off the checkpoint grid: the stop itself writes one
    train(pieces, resume=True, max_steps=2)
    train(pieces, resume=True)
    assert losses(full.out_dir) == losses(pieces.out_dir)
    a, b = final_weights(full.out_dir), final_weights(pieces.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_activation_checkpointing_changes_nothing_but_memory(data_dir, tmp_path):
    plain = tiny_train_config(data_dir, tmp_path / "plain", total_tokens=256 * 3, eval_every=0)
    recomputed = tiny_train_config(
        data_dir, tmp_path / "ac", total_tokens=256 * 3, eval_every=0, activation_checkpointing=True
    )
    train(plain)
    train(recomputed)
    assert losses(plain.out_dir) == pytest.approx(losses(recomputed.out_dir), rel=1e-6)
    model, _ = ckpt.load_pretrained(ckpt.list_checkpoints(recomputed.out_dir)[-1])  # same state-dict keys
    assert model.state_dict().keys() == Transformer(model.cfg).state_dict().keys()


def test_checkpoints_are_complete_pruned_and_loadable(data_dir, tmp_path):
    cfg = tiny_train_config(data_dir, tmp_path / "run", keep_last=2)
    result = train(cfg)
    kept = ckpt.list_checkpoints(cfg.out_dir)
    assert [p.name for p in kept] == ["step-00000006", "step-00000008"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no temporary folders left behind
    shard = "shard-00001-model-00001-of-00001.safetensors"  # one process: one shard file per folder
    files = sorted(p.relative_to(kept[-1]).as_posix() for p in kept[-1].rglob("*") if p.is_file())
    assert files == sorted(
        ["config.yaml", "manifest.json", f"model/{shard}", f"optimizer/{shard}", "optimizer.json"]
        + ["tokenizer.json", "trainer.pt"]
    )
    assert sorted(json.loads((kept[-1] / "manifest.json").read_text())) == sorted(
        set(files) - {"manifest.json"}
    )
    model, tokenizer = ckpt.load_pretrained(kept[-1])
    assert tokenizer is not None and model.cfg == cfg.model_config()
    assert result["val_loss"] < 6.0  # learned something below log(384) = 5.95


def test_training_reduces_loss(data_dir, tmp_path):
    cfg = tiny_train_config(data_dir, tmp_path / "run", total_tokens=256 * 20, ckpt_every=100)
    train(cfg)
    steps = losses(cfg.out_dir)
    assert steps[20] < steps[1] - 1.0


def test_out_dir_with_checkpoints_needs_resume(data_dir, tmp_path):
    cfg = tiny_train_config(data_dir, tmp_path / "run", total_tokens=256 * 2)
    train(cfg)
    with pytest.raises(ConfigError, match="pass --resume"):
        train(cfg)


def test_corrupted_checkpoint_is_reported(data_dir, tmp_path):
    cfg = tiny_train_config(data_dir, tmp_path / "run", total_tokens=256 * 2)
    train(cfg)
    path = ckpt.list_checkpoints(cfg.out_dir)[-1]
    weights = model_file(path)
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_pretrained(path)


def test_lr_schedule_warms_up_then_decays_to_min(data_dir, tmp_path):
    cfg = tiny_train_config(
        data_dir, tmp_path, total_tokens=10_000, warmup_tokens=1_000, global_batch_tokens=256
    )
    assert lr_at(0, cfg) < lr_at(500, cfg) < cfg.lr
    assert lr_at(1_000, cfg) == pytest.approx(cfg.lr)
    assert lr_at(10_000, cfg) == pytest.approx(cfg.min_lr)


def test_warmup_longer_than_the_run_is_cut_to_a_tenth_with_a_warning(tmp_path):
    shipped = Path(__file__).parent.parent / "configs" / "tiny-ds-moe.yaml"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_train_config(shipped).warmup_tokens == 200_000
    with pytest.warns(UserWarning, match="warmup_tokens=200,000 is more than total_tokens=100,000"):
        cfg = load_train_config(shipped, ["total_tokens=100000"])
    assert cfg.warmup_tokens == 10_000 and lr_at(10_000, cfg) == pytest.approx(cfg.lr)
    with pytest.raises(ConfigError, match="warmup_tokens must be >= 0"):
        tiny_train_config(tmp_path, tmp_path, warmup_tokens=-1)


def test_config_file_and_overrides(data_dir, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  preset: tiny-ds-moe\ndata: {data_dir}\nlr: 3.0e-4\n")
    cfg = load_train_config(path, ["lr=1e-3", "model.alpha_mlp=0.01", "total_tokens=5e6"])
    assert cfg.lr == 1e-3 and cfg.model_config().alpha_mlp == 0.01 and cfg.total_tokens == 5_000_000
    with pytest.raises(ConfigError, match="Did you mean 'warmup_tokens'"):
        load_train_config(path, ["warmup_token=10"])
    with pytest.raises(ConfigError, match="Did you mean 'alpha_mlp'"):
        load_train_config(path, ["model.alpha_mpl=1"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_train_config(path, ["lr"])
    cfg = load_train_config(path, ["global_batch_tokens=1000"])
    with pytest.raises(ConfigError, match="not a multiple of"):
        cfg.accumulation_steps(1)


def test_all_shipped_configs_load_and_build(tmp_path):
    import yaml

    from dsmoe.model.transformer import Transformer
    from dsmoe.training.checkpoint import write_checkpoint

    # Configs that start from a converted checkpoint (configs/convert/) get a tiny stand-in for it.
    converted = small_config(max_seq_len=512)
    stand_in = write_checkpoint(tmp_path / "converted", Transformer(converted).state_dict(), converted)
    configs = sorted(Path(__file__).parent.parent.glob("configs/**/*.yaml"))
    assert configs
    for path in configs:
        overrides = [f"init_from={stand_in}"] if "init_from" in yaml.safe_load(path.read_text()) else []
        cfg = load_train_config(path, overrides)
        Transformer(cfg.model_config().replace(n_layers=1))
        cfg.accumulation_steps(1)


def test_train_stdout_is_one_json_object_and_progress_goes_to_stderr(data_dir, tmp_path):
    model = json.dumps(tiny_model_dict())
    proc = run_train(
        [
            f"data={data_dir}",
            f"model={model}",
            f"out_dir={tmp_path / 'run'}",
            "seq_len=32",
            "micro_batch_size=8",
        ]
        + ["global_batch_tokens=256", "total_tokens=768", "warmup_tokens=256", "eval_every=1", "dtype=fp32"]
    )
    result = json.loads(proc.stdout)  # the whole of stdout, validation lines included, is one JSON object
    assert result["step"] == 3 and "val_loss" in result
    assert "val_loss" in proc.stderr


@pytest.mark.parametrize("regime, rel_tol", [("dense", 1e-5), ("dsmoe", 1e-3)])
def test_two_processes_match_one_on_the_same_global_batch(data_dir, tmp_path, regime, rel_tol):
    """FSDP2 over 2 CPU processes (gloo) vs 1 process with twice the micro-batch. Dense: equal up to float
    reduction order. DS-MoE: each rank's MI loss sees its half of the batch, so the routers' gradients differ by
    that term only (alpha-weighted): within 0.1%."""
    model = json.dumps(tiny_model_dict(regime))
    common = [
        f"data={data_dir}",
        f"model={model}",
        "seq_len=32",
        "global_batch_tokens=256",
        "total_tokens=1024",
        "warmup_tokens=256",
        "lr=3e-3",
        "log_every=1",
        "eval_every=0",
        "ckpt_every=100",
        "dtype=fp32",
    ]
    run_train(common + [f"out_dir={tmp_path / 'one'}", "micro_batch_size=8"])
    run_train(common + [f"out_dir={tmp_path / 'two'}", "micro_batch_size=4"], nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=rel_tol)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4 if regime == "dense" else 1e-2)
