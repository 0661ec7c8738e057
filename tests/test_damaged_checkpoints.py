"""Damaged and mismatched checkpoints, unwritable run folders: one clear error each, nothing lost.

A manifest is checked as data (a damaged one is a damaged checkpoint, skipped on resume like a truncated one); a
config.yaml is checked against the names and shapes of the weights before a model is built; a run that could not
save fails before its first step; a checkpoint that cannot be pruned is a warning."""

import hashlib
import json
import shutil

import pytest
import torch
import yaml
from helpers import prepared_data, small_config, train_cli_args

from dsmoe.cli import main
from dsmoe.config import ConfigError
from dsmoe.model.transformer import Transformer
from dsmoe.model.weights import check_weights, expected_shapes
from dsmoe.training import checkpoint as ckpt


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_data(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """A run folder with checkpoints at steps 2 and 4 (keep_last=2) and its final weights."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", *train_cli_args(data_dir, out, total_steps=4)]) == 0
    return out


def flip_bytes(data: bytes) -> bytes:
    raw = bytearray(data)
    for i in range(0, len(raw), 7):
        raw[i] ^= 0xA5
    return bytes(raw)


def commands_reading(checkpoint, tmp_path) -> list[list[str]]:
    """`dsmoe eval`, `export` and `generate` command lines on ``checkpoint``, each valid but for the checkpoint."""
    text = tmp_path / "text.txt"
    text.write_text("The old man crosses the bridge. " * 20)
    return [
        ["eval", "--checkpoint", str(checkpoint), "--text", str(text)],
        ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")],
        ["generate", "--checkpoint", str(checkpoint), "--prompt", "a", "--max-new-tokens", "2"],
    ]


MANIFEST_DAMAGE = {
    "flipped bytes": lambda text: flip_bytes(text.encode()),
    "a list": lambda text: b"[]",
    "an entry without bytes": lambda text: json.dumps({"trainer.pt": {}}).encode(),
    "a path outside the folder": lambda text: json.dumps(
        {**json.loads(text), "../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}
    ).encode(),
    "a string for bytes": lambda text: json.dumps(
        {k: {**v, "bytes": str(v["bytes"])} for k, v in json.loads(text).items()}
    ).encode(),
    "no model weights": lambda text: json.dumps(
        {k: v for k, v in json.loads(text).items() if not k.startswith("model")}
    ).encode(),
    "deep nesting": lambda text: b"[" * 100_000,
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_a_damaged_manifest_is_one_clear_error_and_resume_skips_it(
    data_dir, trained_run, tmp_path, damage, capsys
):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    newest = ckpt.list_checkpoints(out)[-1]
    manifest = newest / ckpt.MANIFEST
    manifest.write_bytes(MANIFEST_DAMAGE[damage](manifest.read_text()))
    with pytest.raises(ckpt.CheckpointError, match=f"{manifest} is corrupted"):
        ckpt.verify_checkpoint(newest)
    damaged = manifest.read_bytes()
    for command in commands_reading(newest, tmp_path):
        capsys.readouterr()
        assert main(command) == 2
        assert f"{manifest} is corrupted" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert main(["train", "--resume", f"out_dir={out}"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping {newest}: {manifest} is corrupted" in err
    assert f"resuming {ckpt.list_checkpoints(out)[0]}" in err and "Traceback" not in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    kept = out / "checkpoints" / "superseded" / newest.name / ckpt.MANIFEST  # set aside, never deleted
    assert kept.read_bytes() == damaged


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_layers": 8}, "the config describes a model of"),
        ({"n_layers": 1_000_000}, "but the weights hold"),  # refused by arithmetic, before any model is built
        ({"d_expert": 8, "n_mlp_experts": 16}, "the config describes a model of"),
    ],
)
def test_a_config_that_does_not_fit_the_weights_is_refused(trained_run, tmp_path, change, message, capsys):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(ckpt.list_checkpoints(trained_run)[-1], checkpoint)
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    config["model"].update(change)
    edited = yaml.safe_dump(config).encode()
    (checkpoint / "config.yaml").write_bytes(edited)
    manifest = json.loads(
        (checkpoint / ckpt.MANIFEST).read_text()
    )  # edited consistently: the sizes still match
    manifest["config.yaml"] = {"bytes": len(edited), "sha256": hashlib.sha256(edited).hexdigest()}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))
    for command in commands_reading(checkpoint, tmp_path):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{checkpoint}: config.yaml and the model weights" in err and message in err
        assert "restore the config written with these weights" in err
    assert not (tmp_path / "hf").exists()


def test_check_weights_names_every_missing_unexpected_and_reshaped_tensor():
    cfg = small_config()
    want = expected_shapes(cfg)
    assert want == {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    check_weights(cfg, want, "here")  # fits
    held = dict(want)
    w_in = next(k for k in held if k.endswith("experts.w_in"))
    held["blocks.0.att.renamed"] = held.pop("blocks.0.att.wq")
    held[w_in] = (held[w_in][1], held[w_in][0], *held[w_in][2:])  # same size, another shape
    with pytest.raises(ConfigError) as err:
        check_weights(cfg, held, "here")
    assert (
        f"missing: blocks.0.att.wq; unexpected: blocks.0.att.renamed; other shape: {w_in} (config "
        f"{list(want[w_in])}, weights {list(held[w_in])})" in str(err.value)
    )


def test_an_unwritable_checkpoint_folder_fails_before_the_first_step(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ckpt.CKPT_DIR).write_text("a file where the checkpoint folder should be")
    assert main(["train", *train_cli_args(data_dir, out, total_steps=4)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write checkpoints to {out / ckpt.CKPT_DIR}" in err and "choose another out_dir" in err
    assert not (out / "metrics.jsonl").exists()  # not a step was taken


def test_a_checkpoint_that_cannot_be_pruned_is_a_warning(data_dir, tmp_path, capsys, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ckpt, "_discard", refuse)
    out = tmp_path / "run"
    assert main(["train", *train_cli_args(data_dir, out, total_steps=8, keep_last=1)]) == 0
    err = capsys.readouterr().err
    assert "warning: could not delete the old checkpoint" in err and "Permission denied" in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"step-{s:08d}" for s in (2, 4, 6, 8)]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "prune_failed" for e in events) == 3
    assert torch.isfinite(torch.tensor([e["loss"] for e in events if "loss" in e])).all()
