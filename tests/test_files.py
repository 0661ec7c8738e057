"""Every file and folder dsmoe writes gets the mode the umask gives, atomic writes (temporary name, then rename)
included: shared under umask 022, private under 077."""

import contextlib
import os
import stat

import pytest
from helpers import prepared_data, synthetic_corpus, tiny_train_config

from dsmoe.cli import main
from dsmoe.files import umask, write_atomic
from dsmoe.training.checkpoint import list_checkpoints
from dsmoe.training.loop import train


@contextlib.contextmanager
def process_umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def wrong_modes(root, mask):
    """Paths under ``root`` (itself included) whose mode is not what mkdir() / open() give under ``mask``."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != expected:
            wrong.append(f"{path.relative_to(root.parent)}: {mode:o}, not {expected:o}")
    return wrong


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_checkpoint_export_prepared_data_and_sweep_honour_the_umask(tmp_path, mask):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(f'{{"text": "{d}"}}\n' for d in synthetic_corpus(n_docs=4, seed=5)))
    with process_umask(mask):
        data = prepared_data(tmp_path / "corpus")
        train(tiny_train_config(data, tmp_path / "run", eval_every=0), max_steps=2)
        checkpoint = str(list_checkpoints(tmp_path / "run")[-1])
        assert main(["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "hf")]) == 0
        sweep = ["--text", str(docs), "--strategies", "topk", "--ks", "1", "--out", str(tmp_path / "sweep")]
        assert main(["sweep", "--checkpoint", checkpoint, *sweep]) == 0
    wrong = [w for name in ("corpus", "run", "hf", "sweep") for w in wrong_modes(tmp_path / name, mask)]
    assert not wrong, "\n".join(wrong)


def test_umask_is_read_without_changing_it(tmp_path):
    with process_umask(0o027):
        assert umask() == 0o027
        write_atomic(tmp_path / "a" / "b.txt", "text")
        assert umask() == 0o027
    assert (tmp_path / "a" / "b.txt").read_text() == "text"
    assert stat.S_IMODE((tmp_path / "a" / "b.txt").stat().st_mode) == 0o640
