"""Resuming a run: which checkpoint to continue from, and with which configuration.

A run's configuration is the one saved in its checkpoints, so ``--resume`` reads it from there, not from the command
line. Only the settings in RESUME_CHANGEABLE may differ on resume: they change how long the run goes, how often it
logs, evaluates and checkpoints, and where it runs or finds its files, never what one optimizer step computes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from dsmoe.config import ConfigError, coerce_numbers
from dsmoe.training import checkpoint as ckpt
from dsmoe.training.config import (
    RESUME_CHANGEABLE,
    TrainConfig,
    apply_overrides,
    load_train_config,
    read_config_file,
)

SUPERSEDED = "superseded"  # checkpoints newer than the one resumed from are moved here, never deleted


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def find_checkpoint(
    out_dir: str | Path, resume_from: str | Path | None = None, check_hashes: bool = True, report: bool = True
) -> Path | None:
    """The checkpoint to resume from: ``resume_from`` when given (it must verify), else the newest checkpoint of
    ``out_dir`` whose files match its manifest; newer ones that do not are skipped with a warning. None when
    ``out_dir`` has no checkpoint."""
    if resume_from is not None:
        path = Path(resume_from)
        if not path.is_dir():
            raise ckpt.CheckpointError(f"--resume-from {path}: no such checkpoint folder")
        ckpt.verify_checkpoint(path, check_hashes)
        return _training_checkpoint(path)
    found = ckpt.list_checkpoints(out_dir)
    for path in reversed(found):
        try:
            ckpt.verify_checkpoint(path, check_hashes)
        except (ckpt.CheckpointError, OSError) as err:
            if report:
                say(f"warning: skipping {path}: {err}")
            continue
        return _training_checkpoint(path)
    if found:
        raise ckpt.CheckpointError(
            f"no checkpoint in {Path(out_dir) / ckpt.CKPT_DIR} matches its manifest; the run cannot be resumed"
        )
    return None


def _training_checkpoint(path: Path) -> Path:
    if not (path / "trainer.pt").is_file() or saved_train_values(path) is None:
        raise ConfigError(
            f"{path} is not a checkpoint of a training run (no trainer state or training config): to start a "
            f"new run from its weights, set init_from={path}"
        )
    return path


def saved_train_values(path: Path) -> dict[str, Any] | None:
    try:
        return yaml.safe_load((Path(path) / "config.yaml").read_text()).get("train")
    except (yaml.YAMLError, AttributeError) as err:
        raise ckpt.CheckpointError(f"{Path(path) / 'config.yaml'} is corrupted ({err})") from err


def _same(key: str, saved: Any, new: Any) -> bool:
    if key in ("out_dir", "data") and saved is not None and new is not None:
        return Path(saved).resolve() == Path(new).resolve()
    return saved == new


def check_changes(source: Path, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, new)}`` for each setting of ``cfg`` that differs from the one saved in ``source``; a
    ConfigError naming every difference outside RESUME_CHANGEABLE. The model is compared as resolved (``model.KEY``)."""
    saved = saved_train_values(source) or {}
    new = cfg.to_dict()
    changes = {
        key: (saved[key], new[key])
        for key in new
        if key != "model" and key in saved and not _same(key, saved[key], new[key])
    }
    saved_model, new_model = ckpt.read_model_config(source).to_dict(), cfg.model_config().to_dict()
    changes.update(
        {
            f"model.{key}": (value, new_model[key])
            for key, value in saved_model.items()
            if value != new_model[key]
        }
    )
    fixed = [
        f"{key} (saved {old!r}, now {value!r})"
        for key, (old, value) in changes.items()
        if key not in RESUME_CHANGEABLE
    ]
    if fixed:
        raise ConfigError(
            f"cannot resume {source} with a different {', '.join(fixed)}: these settings define the run. On resume "
            f"only {', '.join(RESUME_CHANGEABLE)} may change; to train with other settings, start a new run in "
            f"another out_dir, with init_from={source} to begin from these weights"
        )
    return changes


def resume_config(
    config_path: str | Path | None, overrides: list[str], resume_from: str | Path | None = None
) -> TrainConfig:
    """``dsmoe train --resume``: the run's saved configuration with the command line's ``key=value`` overrides
    applied. The run is found through ``--resume-from`` or ``out_dir`` (from the overrides, else the config file,
    else the default); the config file's other values are not used. Without a checkpoint to resume, a new run starts
    from the config file and overrides."""
    given = apply_overrides({}, overrides)  # checks the keys; values are checked against the saved ones later
    given_keys = {key for key, value in given.items() if key != "model" or value}
    file_values = read_config_file(config_path) if config_path is not None else {}
    if resume_from is not None:
        out_dir = given.get("out_dir", str(Path(resume_from).parent.parent))
    else:
        out_dir = given.get("out_dir", file_values.get("out_dir", TrainConfig.out_dir))
    # Sizes only: train() verifies the hashes, once, and skips to an older checkpoint of the same run if need be.
    source = find_checkpoint(out_dir, resume_from, check_hashes=False, report=False)
    if source is None:
        if config_path is None:
            raise ConfigError(
                f"--resume: {out_dir} holds no checkpoint to resume; name the run's folder with out_dir=..., "
                "or pass --config to start a new run"
            )
        say(f"no checkpoint in {out_dir}: starting a new run")
        return load_train_config(config_path, overrides)
    saved = saved_train_values(source) or {}
    ignored = sorted(
        key
        for key, value in coerce_numbers(TrainConfig, file_values, str(config_path)).items()
        if key not in given_keys and key in saved and not _same(key, saved[key], value)
    )
    if ignored:
        say(
            f"note: {config_path} differs from the configuration saved with the run in {', '.join(ignored)}; "
            "the saved values are used (change one that may change with key=value)"
        )
    values = apply_overrides({**saved, "out_dir": str(out_dir)}, overrides)
    return TrainConfig(**coerce_numbers(TrainConfig, values, "the command line"))


def set_aside_newer(out_dir: str | Path, source: Path) -> list[Path]:
    """Move the checkpoints of ``out_dir`` newer than ``source`` (the one resumed from) to checkpoints/superseded/:
    the resumed run writes its own checkpoints at those steps, and nothing is deleted. Returns the new paths."""
    moved = []
    for path in ckpt.list_checkpoints(out_dir):
        if step_of(path) <= step_of(source):
            continue
        (path.parent / SUPERSEDED).mkdir(exist_ok=True)
        dest, n = path.parent / SUPERSEDED / path.name, 0
        while dest.exists():  # an earlier resume set aside a checkpoint of the same step
            n += 1
            dest = path.parent / SUPERSEDED / f"{path.name}.{n}"
        os.replace(path, dest)
        moved.append(dest)
    return moved
