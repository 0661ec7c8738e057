"""Checkpoints: model, optimizer, trainer state (step, tokens, data position, RNG) and the resolved config and
tokenizer, written to a temporary folder and renamed, so a run killed mid-write never leaves a checkpoint that looks
complete. A manifest of file sizes and hashes catches truncation and corruption on load. Nothing is unpickled on
load beyond tensors and plain values (``torch.load(weights_only=True)``); the rest is safetensors, JSON and YAML.

A training run (``write_sharded_checkpoint``, collective over the ranks) writes, in RUN/checkpoints/step-NNNNNNNN/::

    config.yaml      the resolved model and train config, and the versions of dsmoe, torch and Python
    tokenizer.json   the tokenizer the data was prepared with
    trainer.pt       step, tokens, loader position, RNG state (tensors and plain values)
    model/           the model, one safetensors file of shards per rank (torch.distributed.checkpoint, see sharded.py)
    optimizer/       the AdamW moments and step counts, sharded the same way
    optimizer.json   the optimizer's param groups (hyperparameters, by parameter name)
    manifest.json    bytes and sha256 of every file above, by path relative to the folder

Every rank writes its own shards (there is no gather to rank 0) and reads back only the slices it holds, whatever
the number of ranks that wrote them. On more than one node, RUN must be on a file system that every node sees.

``write_checkpoint`` (``dsmoe convert``, weights-only checkpoints) writes the single-file layout that training runs
wrote before sharding, and which still loads and resumes everywhere: ``model.safetensors`` for ``model/``,
``optimizer.pt`` (a full optimizer state dict) for ``optimizer/`` and ``optimizer.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.files import apply_umask, temp_folder
from dsmoe.model.weights import check_weights, safetensors_shapes
from dsmoe.training import sharded

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
    """Write a complete single-file checkpoint folder at ``path`` atomically (temporary sibling folder, then
    rename), from full state dicts held by this process."""
    path = Path(path)
    if any(value.dtype == torch.int8 for value in model_state.values()):
        raise ValueError(
            "this model's weights are quantized for inference (dsmoe.inference.quantize); save the full-precision "
            "model and quantize it after loading (--quantize int8)"
        )
    tmp = temp_folder(path)
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors"
        )
        _write_config(tmp, model_cfg, train_cfg)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
        if tokenizer_file is not None and Path(tokenizer_file).is_file():
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        _fsync(sorted(tmp.iterdir()))
        _publish(tmp, path, _file_entries(tmp, sorted(tmp.iterdir())))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_config(folder: Path, model_cfg: ModelConfig, train_cfg: dict | None) -> None:
    config = {"model": model_cfg.to_dict(), "train": train_cfg, "versions": versions()}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _file_entries(root: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    return {f.relative_to(root).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files}


def _fsync(files: list[Path]) -> None:
    """Flush file contents before the rename makes them visible."""
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _publish(tmp: Path, path: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Write the manifest of ``tmp``'s (already flushed) files and rename ``tmp`` onto ``path``."""
    (tmp / MANIFEST).write_text(json.dumps(dict(sorted(entries.items())), indent=1))
    _fsync([tmp / MANIFEST])
    apply_umask(tmp)
    if path.exists():
        _discard(path)
    os.replace(tmp, path)


def write_sharded_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_cfg: ModelConfig,
    *,
    trainer_state: dict,
    train_cfg: dict,
    tokenizer_file: Path | None = None,
) -> bool:
    """Write the checkpoint of a training run at ``path`` atomically; every rank calls it (collective). Each rank
    writes its own model and optimizer shards and hashes its share of the files; rank 0 writes the other files,
    the manifest, and renames the folder once every rank is done. False (nothing written) when ``path`` exists."""
    path = Path(path)
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded.distributed() else (0, 1)
    tmp = temp_folder(path) if rank == 0 and not path.exists() else None
    tmp = sharded.broadcast_from_rank0(tmp)
    if tmp is None:
        return False
    try:
        param_groups = sharded.save_model_and_optimizer(tmp, model, optimizer)
        if rank == 0:
            _write_config(tmp, model_cfg, train_cfg)
            torch.save(trainer_state, tmp / "trainer.pt")
            if param_groups is not None:
                sharded.write_param_groups(tmp, param_groups)
            if tokenizer_file is not None and Path(tokenizer_file).is_file():
                shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
            _fsync([f for f in tmp.iterdir() if f.is_file()])  # the shards were flushed by whoever wrote them
        sharded.barrier()
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        entries = sharded.gather_to_rank0(_file_entries(tmp, files[rank::world]))
        if rank == 0:
            _publish(tmp, path, {k: v for part in entries for k, v in part.items()})
        sharded.barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def is_sharded(path: str | Path) -> bool:
    """Whether checkpoint folder ``path`` has the sharded layout (``model/``), not ``model.safetensors``."""
    return (Path(path) / sharded.MODEL_DIR).is_dir()


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest of checkpoint folder ``path``, checked as data: a JSON object mapping each file's path inside the
    folder to its ``bytes`` (an integer >= 0) and ``sha256`` (64 hex digits), listing config.yaml and the model
    weights. Anything else is a CheckpointError, so a damaged manifest is treated as a damaged checkpoint."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(
            f"{path} is not a complete dsmoe checkpoint (no {MANIFEST}); "
            "point at a folder written by `dsmoe train` or `dsmoe convert`"
        )
    try:
        files = json.loads(manifest.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{manifest} is corrupted ({err}); resume from an earlier checkpoint") from err

    def entry_ok(name: Any, meta: Any) -> bool:
        inside = (
            isinstance(name, str) and name and not Path(name).is_absolute() and ".." not in Path(name).parts
        )
        return (
            bool(inside)
            and isinstance(meta, dict)
            and set(meta) == {"bytes", "sha256"}
            and type(meta["bytes"]) is int
            and meta["bytes"] >= 0
            and isinstance(meta["sha256"], str)
            and len(meta["sha256"]) == 64
            and all(c in "0123456789abcdef" for c in meta["sha256"])
        )

    if not isinstance(files, dict):
        raise CheckpointError(
            f"{manifest} is corrupted: it holds a JSON {type(files).__name__}, not an object of files; resume "
            "from an earlier checkpoint"
        )
    bad = [name for name, meta in files.items() if not entry_ok(name, meta)]
    if bad:
        raise CheckpointError(
            f"{manifest} is corrupted: the entry for {bad[0]!r} is not a file inside the folder with 'bytes' and "
            "'sha256'; resume from an earlier checkpoint"
        )
    weights = "model.safetensors" in files or any(name.startswith(f"{sharded.MODEL_DIR}/") for name in files)
    if "config.yaml" not in files or not weights:
        raise CheckpointError(
            f"{manifest} is corrupted: it does not list config.yaml and the model weights; resume from an "
            "earlier checkpoint"
        )
    return files


def verify_checkpoint(path: Path, check_hashes: bool = True) -> None:
    path = Path(path)
    for name, meta in read_manifest(path).items():
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


def prune_checkpoints(out_dir: Path, keep_last: int) -> str | None:
    """Delete all but the ``keep_last`` newest checkpoints (and temporaries of killed writes). A checkpoint that
    cannot be deleted is kept: the returned warning says which and why (None when all went)."""
    try:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            _discard(old)
    except OSError as err:
        return f"could not delete the old checkpoint {err.filename or ''} ({err.strerror or err}); it is kept"
    root = Path(out_dir) / CKPT_DIR
    for stale in root.glob(".step-*.tmp"):  # left by a run killed while writing or deleting
        shutil.rmtree(stale, ignore_errors=True)
    return None


def check_writable(out_dir: str | Path) -> None:
    """Create the run's checkpoint folder if needed and write (then remove) a file in it, so that a run that could
    not save fails before its first step, not at its first checkpoint."""
    folder = Path(out_dir) / CKPT_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"cannot write checkpoints to {folder} ({err.strerror or err}): make it a writable folder, or choose "
            "another out_dir"
        ) from err


def read_model_config(path: str | Path) -> ModelConfig:
    file = Path(path) / "config.yaml"
    try:
        model = yaml.safe_load(file.read_bytes().decode("utf-8"))["model"]
    except (UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{file} is corrupted (no readable model config: {type(err).__name__}: {err}); resume from an "
            "earlier checkpoint"
        ) from err
    if not isinstance(model, dict):
        raise CheckpointError(
            f"{file} is corrupted: its 'model' is not a mapping; resume from an earlier checkpoint"
        )
    return ModelConfig.from_dict(model)


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The model config of checkpoint folder ``path`` after the cheap checks (the folder, its config.yaml, the
    sizes of the files its manifest lists, the weights' names and shapes against the config), so that commands can
    check their other arguments before loading any weight."""
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
    cfg = read_model_config(path)
    check_weights(cfg, model_shapes(path), f"{path}: config.yaml and the model weights")
    return cfg


def model_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every model tensor of a checkpoint of either layout, from the files' headers."""
    path = Path(path)
    try:
        if is_sharded(path):
            return sharded.full_model_shapes(path)
    except Exception as err:  # DCP's reader raises its own error types for malformed headers
        raise CheckpointError(f"cannot read the shard headers in {path / sharded.MODEL_DIR}: {err}") from err
    return safetensors_shapes([path / "model.safetensors"])


def load_model_state(path: Path, check_hashes: bool = True) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint of either layout, read by this process alone."""
    verify_checkpoint(path, check_hashes)
    path = Path(path)
    weights = path / sharded.MODEL_DIR if is_sharded(path) else path / "model.safetensors"
    try:
        return sharded.read_full_model_state(path) if is_sharded(path) else load_file(weights)
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"cannot read {weights}: {err}") from err


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
