"""Killed runs lose nothing; bad input gets one clear error and changes nothing on disk; numerical faults are
caught; fuzzing of config parsing, CLI arguments, corpus readers and sparse settings."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import prepared_data, small_config, tiny_model_dict, tiny_train_config, train_cli_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsmoe.cli import main
from dsmoe.config import ConfigError, ModelConfig
from dsmoe.data.corpus import read_documents
from dsmoe.data.errors import DataError
from dsmoe.data.loader import TokenLoader
from dsmoe.model.routing import route
from dsmoe.model.settings import STRATEGIES
from dsmoe.training import checkpoint as ckpt
from dsmoe.training.config import TrainConfig
from dsmoe.training.loop import NonFiniteError, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_data(tmp_path_factory.mktemp("corpus"))


def run_args(data_dir, out_dir, total_steps=10):
    return train_cli_args(data_dir, out_dir, total_steps=total_steps)


# A child that trains and SIGKILLs itself inside write_checkpoint, after the folder is fully written but before
# the rename that publishes it: the worst moment to die.
KILL_IN_WRITE = """
import os, signal, sys
from dsmoe.training import checkpoint as ck
from dsmoe.cli import main
real_replace, calls = ck.os.replace, []
def dying_replace(src, dst):
    calls.append(dst)
    if len(calls) == int(os.environ["KILL_AT_WRITE"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
ck.os.replace = dying_replace
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _child(args, extra_env=None, script=None):
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "dsmoe", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _steps_logged(out_dir):
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max([json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line] or [0])


def test_sigkill_at_any_moment_loses_nothing(data_dir, tmp_path):
    reference = tmp_path / "uninterrupted"
    assert _child(run_args(data_dir, reference)).wait(timeout=300) == 0
    run = tmp_path / "killed"
    kills = 0
    # 1) killed inside the 2nd checkpoint write (step 4): the step-2 checkpoint must stay the latest complete one
    assert _child(run_args(data_dir, run), {"KILL_AT_WRITE": "2"}, KILL_IN_WRITE).wait(timeout=300) == -9
    kills += 1
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]
    assert list((run / "checkpoints").glob(".step-00000004*.tmp"))  # the half-published folder is ignored
    ckpt.verify_checkpoint(ckpt.list_checkpoints(run)[-1])
    # 2) killed mid-training at two later moments, each time resuming
    for target in (6, 8):
        proc = _child([*run_args(data_dir, run), "--resume"])
        deadline = time.time() + 240
        while _steps_logged(run) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        for done in ckpt.list_checkpoints(run):
            ckpt.verify_checkpoint(done)
    assert _child([*run_args(data_dir, run), "--resume"]).wait(timeout=300) == 0
    assert kills == 3
    a = ckpt.load_model_state(ckpt.list_checkpoints(reference)[-1])
    b = ckpt.load_model_state(ckpt.list_checkpoints(run)[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((run / "checkpoints").glob(".step-*"))  # stale temporary folders were cleaned


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))}


def test_shard_with_ids_outside_the_vocabulary_is_named(data_dir, tmp_path):
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(data_dir, bad)
    shard = bad / "train-00000.bin"
    tokens = np.memmap(shard, dtype=np.uint16, mode="r+")
    tokens[::40] = 60000  # every window holds one
    tokens.flush()
    loader = TokenLoader(bad, "train", 64, 32, vocab_size=384)
    before = _tree(bad)
    with pytest.raises(
        DataError, match=r"token id 60000 in the train shards .* outside the vocabulary of 384"
    ):
        for _ in range(loader.batches_per_epoch):
            next(loader)
    assert _tree(bad) == before


def test_tokenizer_that_does_not_match_the_model(data_dir):
    with pytest.raises(DataError, match="more than the model's vocab_size 97"):
        TokenLoader(data_dir, "train", 2, 16, vocab_size=97)


def test_resuming_on_data_with_another_tokenizer_is_refused(data_dir, tmp_path):
    cfg = tiny_train_config(data_dir, tmp_path / "r", eval_every=0)
    train(cfg, max_steps=1)
    other = prepared_data(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="differs from the one the checkpoint was trained with"):
        train(TrainConfig(**{**cfg.to_dict(), "data": str(other)}), resume=True)


def test_corrupted_checkpoint_bytes_are_detected(data_dir, tmp_path):
    model_state = {"w": torch.ones(4)}
    path = ckpt.write_checkpoint(tmp_path / "c", model_state, small_config())
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.load_model_state(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="not a complete dsmoe checkpoint"):
        ckpt.load_model_state(path)


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_non_finite_loss_is_caught_and_named(data_dir, tmp_path, mode):
    cfg = tiny_train_config(data_dir, tmp_path / mode, total_tokens=1024, eval_every=0, nonfinite=mode)
    train(cfg, max_steps=2)
    good = ckpt.load_model_state(ckpt.list_checkpoints(cfg.out_dir)[-1])
    from dsmoe.model import experts

    original = experts.MLPExperts.dense

    def poisoned(self, x, probs):
        return original(self, x, probs) * float("nan") if self.training else original(self, x, probs)

    experts.MLPExperts.dense = poisoned
    try:
        if mode == "stop":
            with pytest.raises(NonFiniteError, match=r"step 3 .*micro-batch 0 .*last good checkpoint"):
                train(cfg, resume=True)
        else:
            train(cfg, resume=True)
            log = (Path(cfg.out_dir) / "metrics.jsonl").read_text()
            assert log.count('"skipped_step"') == 2
    finally:
        experts.MLPExperts.dense = original
    latest = ckpt.load_model_state(ckpt.list_checkpoints(cfg.out_dir)[-1])
    assert all(torch.equal(good[k], latest[k]) for k in good)  # skipped steps never touched the weights


@pytest.mark.parametrize("top", [1.0, 0.6], ids=["one-hot", "soft"])
def test_router_collapse_is_reported_from_the_logged_load(data_dir, tmp_path, capsys, top):
    """One signal: the warning fires where metrics.jsonl logs max_load above 0.9, also when every token's top expert
    is the same one with a soft probability (0.6: the mean probability never reaches 0.9)."""
    cfg = tiny_train_config(data_dir, tmp_path / "run", total_tokens=256, warmup_tokens=0, eval_every=0)
    from dsmoe.model import router

    original = router.Router.forward

    def collapsed(self, x):
        n = self.weight.shape[0]
        probs = torch.full((x.shape[0], n), (1 - top) / (n - 1))
        probs[:, 0] = top
        return probs + 0 * original(self, x)

    router.Router.forward = collapsed
    try:
        train(cfg)
    finally:
        router.Router.forward = original
    printed = "".join(capsys.readouterr())
    assert "router collapse in mlp layer 0" in printed and "router collapse in att layer 1" in printed
    assert printed.count("router collapse in mlp layer 0") == 1  # once per router
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r.get("event") == "router_collapse"]
    loads = next(r for r in rows if "max_load_mlp" in r)["max_load_mlp"]
    assert {(e["kind"], e["layer"]) for e in events} >= {("mlp", 0), ("att", 1)} and min(loads) > 0.9


# ----- fuzzing -----

FIELDS = [f for f in ModelConfig.__dataclass_fields__]
values = st.one_of(
    st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS + ["n_mlp_expert", "bogus"]), values, max_size=8))
def test_fuzz_model_config_parsing(changes):
    base = small_config().to_dict()
    try:
        cfg = ModelConfig.from_dict({**base, **changes})
    except ConfigError as err:
        assert str(err)
    else:
        assert cfg.non_embedding_params > 0


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    "info",
                    "--preset",
                    "tiny-ds-moe",
                    "ds-moe-1b",
                    "--strategy",
                    "topk",
                    "threshold",
                    "--k",
                    "--threshold",
                    "--json",
                    "--att-strategy",
                    "0",
                    "-1",
                    "40",
                    "nan",
                    "train",
                    "data",
                    "x=1",
                ]
            ),
            st.text(max_size=6),
        ),
        max_size=7,
    )
)
def test_fuzz_cli_arguments(argv):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        assert exit_.code in (0, 2)
    else:
        assert code in (0, 2)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=300), st.text(max_size=50_000)), min_size=1, max_size=4))
def test_fuzz_corpus_readers(tmp_path, contents):
    folder = tmp_path / f"c{abs(hash(tuple(map(repr, contents))))}"
    folder.mkdir()
    for i, content in enumerate(contents):
        if isinstance(content, bytes):
            (folder / f"{i}.txt").write_bytes(content)
            (folder / f"{i}.jsonl").write_bytes(content)
        else:
            (folder / f"{i}.txt").write_text(content)
            (folder / f"{i}.jsonl").write_text(json.dumps({"text": content}) + "\n")
    try:
        docs = list(read_documents([folder]))
    except DataError as err:
        assert str(folder) in str(err) or "no" in str(err)
    else:
        assert docs and all(isinstance(d, str) and d.strip() for d in docs)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(STRATEGIES),
    st.integers(-2, 20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.integers(1, 12),
    st.integers(1, 40),
)
def test_fuzz_sparse_settings(strategy, k, threshold, normalize, n_experts, n_tokens):
    from dsmoe.model.plan import check_setting

    cfg = small_config(n_mlp_experts=n_experts)
    try:
        setting = check_setting("mlp", strategy, k, threshold, normalize, cfg, None)
    except ConfigError as err:
        assert str(err)
        return
    if setting is None:  # one expert: no router, nothing to route
        assert n_experts == 1
        return
    probs = torch.softmax(torch.randn(n_tokens, n_experts) * 3, dim=-1)
    routing = route(probs, setting)
    counts = routing.counts_per_token
    assert ((counts >= 1) & (counts <= n_experts)).all()
    token, expert, weight, per_expert = routing.pairs()
    assert int(per_expert.sum()) == int(counts.sum()) == token.numel()
    assert torch.isfinite(weight).all()


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a crafted checkpoint would do with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_a_pickle_payload_is_refused_and_runs_nothing(data_dir, tmp_path):
    cfg = tiny_train_config(data_dir, tmp_path / "run", total_tokens=256 * 2, eval_every=0)
    train(cfg)
    newest = ckpt.list_checkpoints(cfg.out_dir)[-1]
    marker = tmp_path / "payload-ran"
    state = ckpt.load_state(newest / "trainer.pt")  # a real trainer state loads with weights_only=True
    torch.save({**state, "extra": _Payload(marker)}, newest / "trainer.pt")
    manifest = json.loads(
        (newest / "manifest.json").read_text()
    )  # a consistent manifest: only the pickle is bad
    data = (newest / "trainer.pt").read_bytes()
    manifest["trainer.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    longer = tiny_train_config(data_dir, tmp_path / "run", total_tokens=256 * 4, eval_every=0)
    with pytest.raises(ConfigError, match="could run code when loaded"):
        train(longer, resume=True)
    assert not marker.exists()


def test_a_warning_prints_once_as_one_line(data_dir, tmp_path):
    """The train and validation loaders both find the model's vocabulary larger than the data's: the command prints
    that once, as one line, without Python's file:line and source line."""
    model = json.dumps({**tiny_model_dict(), "vocab_size": 4096})
    args = [
        a if not a.startswith("model=") else f"model={model}" for a in run_args(data_dir, tmp_path / "run", 2)
    ]
    child = subprocess.run(
        [sys.executable, "-m", "dsmoe", "train", *args, "eval_every=2"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    warned = [line for line in child.stderr.splitlines() if "were tokenized with a vocabulary" in line]
    assert len(warned) == 1 and warned[0].startswith("dsmoe: warning: shards in "), child.stderr[-2000:]
    assert "warnings.warn(" not in child.stderr and "UserWarning" not in child.stderr
