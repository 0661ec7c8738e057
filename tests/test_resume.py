"""Resuming a run: the configuration comes from the checkpoint; only RESUME_CHANGEABLE settings may change, each
reported; a corrupt newest checkpoint is skipped; --resume-from picks one."""

import json

import pytest
import torch
from helpers import model_file, prepared_data, small_config, tiny_train_config, train_cli_args

from dsmoe.cli import main
from dsmoe.config import ConfigError
from dsmoe.model.transformer import Transformer
from dsmoe.training import checkpoint as ckpt
from dsmoe.training.loop import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_data(tmp_path_factory.mktemp("corpus"))


def run_args(data_dir, out_dir):
    """A first run's command line, with overrides a resumed run's command line does not repeat."""
    return train_cli_args(data_dir, out_dir, keep_last=5)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """Final weights of the run trained in one go."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["train", *run_args(data_dir, out)]) == 0
    return final_weights(out)


def final_weights(out_dir):
    return ckpt.load_model_state(ckpt.list_checkpoints(out_dir)[-1])


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_takes_the_configuration_from_the_checkpoint(data_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    config = (
        tmp_path / "run.yaml"
    )  # as in the README: the file names the run, the first command line changed it
    config.write_text(f"model:\n  preset: tiny-ds-moe\ndata: {tmp_path / 'elsewhere'}\nout_dir: {out}\n")
    assert main(["train", "--config", str(config), *run_args(data_dir, out), "--max-steps", "3"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--resume", "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert f"note: {config} differs from the configuration saved with the run in data, model" in err
    assert main(["train", "--resume", f"out_dir={out}"]) == 0  # no config file at all
    assert_same_weights(reference, final_weights(out))


def test_resume_refuses_settings_that_define_the_run(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *run_args(data_dir, out), "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", f"out_dir={out}", "global_batch_tokens=512"]) == 2
    err = capsys.readouterr().err
    assert "with a different global_batch_tokens (saved 256, now 512)" in err
    assert "only total_tokens, log_every" in err
    assert main(["train", "--resume", f"out_dir={out}", "model.d_expert=32", "lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "lr (saved 0.003, now 0.001), model.d_expert (saved 16, now 32)" in err
    assert "size mismatch" not in err
    # train() itself checks a whole config against the checkpoint (demo and repro call it directly)
    cfg = tiny_train_config(data_dir, out, eval_every=0, keep_last=5, min_lr=3e-5, seq_len=16)
    with pytest.raises(ConfigError, match=r"seq_len \(saved 32, now 16\)"):
        train(cfg, resume=True)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"]


def test_resume_reports_each_change_it_accepts(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *run_args(data_dir, out), "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", f"out_dir={out}", "total_tokens=2560", "ckpt_every=5"]) == 0
    captured = capsys.readouterr()
    assert "resume: total_tokens changes from 2048 to 2560" in captured.err
    assert "resume: ckpt_every changes from 2 to 5" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["step"] == 10
    assert main(["train", "--resume", f"out_dir={out}", "total_tokens=1024"]) == 2
    assert "raise total_tokens above 2560" in capsys.readouterr().err


def test_corrupt_newest_checkpoint_is_skipped(data_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *run_args(data_dir, out), "--max-steps", "4"]) == 0
    newest = ckpt.list_checkpoints(out)[-1]
    weights = model_file(newest)
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["train", "--resume", f"out_dir={out}"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping {newest}: checkpoint file {weights} is corrupted" in err
    assert f"resuming {out / 'checkpoints' / 'step-00000002'}" in err
    assert_same_weights(reference, final_weights(out))
    assert model_file(out / "checkpoints" / "superseded" / "step-00000004").read_bytes() == raw


def test_resume_from_a_chosen_checkpoint(data_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *run_args(data_dir, out), "--max-steps", "6"]) == 0
    step2, later = ckpt.list_checkpoints(out)[0], ckpt.list_checkpoints(out)[1:]
    kept = {p.name: model_file(p).read_bytes() for p in later}
    assert main(["train", "--resume-from", str(step2)]) == 0
    assert_same_weights(reference, final_weights(out))
    superseded = out / "checkpoints" / "superseded"
    assert {p.name: model_file(p).read_bytes() for p in superseded.iterdir()} == kept
    capsys.readouterr()
    assert main(["train", "--resume-from", str(out / "checkpoints" / "step-00000099")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    weights_only = ckpt.write_checkpoint(
        tmp_path / "converted", Transformer(small_config()).state_dict(), small_config()
    )
    assert main(["train", "--resume-from", str(weights_only)]) == 2
    assert f"to start a new run from its weights, set init_from={weights_only}" in capsys.readouterr().err


def test_resume_with_nothing_to_resume(data_dir, tmp_path, capsys):
    assert main(["train", "--resume", f"out_dir={tmp_path / 'none'}"]) == 2
    assert "holds no checkpoint to resume; name the run's folder with out_dir=" in capsys.readouterr().err
