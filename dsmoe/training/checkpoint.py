"""Checkpoints: model (safetensors), optimizer, trainer state (step, tokens, data position, RNG) and the resolved
config and tokenizer, written to a temporary folder and renamed, so a run killed mid-write never leaves a checkpoint
that looks complete. A manifest of file sizes and hashes catches truncation and corruption on load."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import random
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.files import apply_umask, temp_folder

CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"


class CheckpointError(ConfigError):
    """A checkpoint is missing, truncated or corrupted."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain Python values, so that loading it needs no pickle."""
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, gauss = legacy
    numpy_state = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        )
    else:  # checkpoints written before 2026-12-02 hold numpy's own tuple
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: Path) -> Any:
    """A ``torch.save``d trainer or optimizer state, read with ``weights_only=True``: tensors and plain Python
    containers only, so a crafted file cannot run code while it is loaded."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"{path} holds pickled objects other than tensors and plain values, which could run code when "
            "loaded, so dsmoe refuses it (checkpoints written before 2026-12-02 kept numpy's RNG state this way: "
            "start a new run from their weights with init_from=)"
        ) from err


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        dsmoe_version = version("dsmoe")
    except PackageNotFoundError:
        dsmoe_version = "unknown"
    return {"dsmoe": dsmoe_version, "torch": str(torch.__version__), "python": platform.python_version()}


def write_checkpoint(
    path: Path,
    model_state: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    *,
    optimizer_state: dict | None = None,
    trainer_state: dict | None = None,
    train_cfg: dict | None = None,
    tokenizer_file: Path | None = None,
) -> Path:
    """Write a complete checkpoint folder at ``path`` atomically (temporary sibling folder, then rename)."""
    path = Path(path)
    tmp = temp_folder(path)
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors"
        )
        config = {"model": model_cfg.to_dict(), "train": train_cfg, "versions": versions()}
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
        if tokenizer_file is not None and Path(tokenizer_file).is_file():
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(files, indent=1))
        apply_umask(tmp)
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            _discard(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def verify_checkpoint(path: Path, check_hashes: bool = True) -> None:
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(
            f"{path} is not a complete dsmoe checkpoint (no {MANIFEST}); "
            "point at a folder written by `dsmoe train` or `dsmoe export`"
        )
    try:
        files = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest} is corrupted ({err}); resume from an earlier checkpoint") from err
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing; resume from an earlier checkpoint")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint file {f} is truncated ({f.stat().st_size} of {meta['bytes']} bytes);"
                " resume from an earlier checkpoint"
            )
        if check_hashes and _sha256(f) != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint file {f} is corrupted (hash mismatch); resume from an earlier checkpoint"
            )


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CKPT_DIR / f"step-{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(out_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _discard(path: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a complete-looking, partial checkpoint:
    hide it under a temporary name first (atomic), then delete."""
    hidden = path.with_name(f".{path.name}.{os.getpid()}.deleting.tmp")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep_last]:
        _discard(old)
    root = Path(out_dir) / CKPT_DIR
    for stale in root.glob(".step-*.tmp"):  # left by a run killed while writing or deleting
        shutil.rmtree(stale, ignore_errors=True)


def read_model_config(path: str | Path) -> ModelConfig:
    config = yaml.safe_load((Path(path) / "config.yaml").read_text())
    return ModelConfig.from_dict(config["model"])


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The model config of checkpoint folder ``path`` after the cheap checks (the folder, its config.yaml, the
    sizes of the files its manifest lists), so that commands can check their other arguments before loading any
    weight."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not (path / "config.yaml").is_file():
        saved = list_checkpoints(path)
        if saved:
            raise CheckpointError(
                f"{path} is a training run folder, not a checkpoint: pass its newest checkpoint, {saved[-1]}"
            )
        raise CheckpointError(
            f"{path} has no config.yaml, so it is not a dsmoe checkpoint; point at a folder written by "
            "`dsmoe train` (RUN/checkpoints/step-*) or `dsmoe convert`"
        )
    verify_checkpoint(path, check_hashes=False)
    return read_model_config(path)


def load_model_state(path: Path, check_hashes: bool = True) -> dict[str, torch.Tensor]:
    verify_checkpoint(path, check_hashes)
    try:
        return load_file(Path(path) / "model.safetensors")
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"cannot read {Path(path) / 'model.safetensors'}: {err}") from err


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer or None) from a checkpoint folder."""
    from dsmoe.model.transformer import Transformer

    path = Path(path)
    cfg = checkpoint_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(load_model_state(path), assign=True, strict=True)
    model.rope_cos, model.rope_sin = _rope(cfg)
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return model.eval(), tokenizer


def _rope(cfg: ModelConfig):
    from dsmoe.model.rope import rope_tables

    return rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
