"""TrainConfig: a typed run configuration read from YAML, with dotted ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dsmoe.config import ConfigError, ModelConfig, coerce_numbers, preset, unknown_key_error

TRAINABLE = ("all", "routers")
INIT_OVERRIDES = ("alpha_att", "alpha_mlp", "max_seq_len", "switch_loss_weight")
# The settings a resumed run may change (dsmoe.training.resume): how long the run goes, how often it logs, evaluates
# and checkpoints, and where it runs or finds its files; never what one optimizer step computes.
RESUME_CHANGEABLE = (
    "total_tokens",  # lengthen (or shorten) the run; the cosine schedule then spans the new length
    "log_every",
    "eval_every",
    "eval_batches",
    "ckpt_every",
    "keep_last",
    "nonfinite",
    "out_dir",  # the run's folder was moved, or the run continues in a new folder
    "data",  # the data was moved (resuming checks that it was tokenized with the run's tokenizer)
    "device",  # (dtype auto follows the device: bf16 on CUDA)
    "compile",  # speed and memory only
    "activation_checkpointing",
)


@dataclass
class TrainConfig:
    """One training run. ``model`` holds a preset name and/or ModelConfig fields (``{preset: tiny-ds-moe,
    alpha_mlp: 1e-3}``); every other field is the trainer's. Schedules count tokens, as the paper does.

    A ``warmup_tokens`` larger than ``total_tokens`` (a shipped config run shorter with a ``total_tokens=``
    override) would keep the learning rate near its start for the whole run: it is cut to 10% of ``total_tokens``,
    with a warning; set ``warmup_tokens`` too to choose another value."""

    model: dict[str, Any]
    data: str  # a folder written by `dsmoe prepare`
    out_dir: str = "runs/default"
    seq_len: int = 256
    micro_batch_size: int = 8  # sequences per forward on each process
    global_batch_tokens: int = 16384  # tokens per optimizer step over all processes (gradient accumulation)
    total_tokens: int = 2_000_000
    warmup_tokens: int = 100_000
    lr: float = 3e-4
    min_lr: float = 3e-5  # the cosine schedule's floor
    weight_decay: float = 0.01  # on weight matrices only; none on norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # auto: bf16 autocast on CUDA, fp32 on CPUs (bf16 matmuls on CPUs without AVX512-BF16/AMX run ~75x slower
    # than fp32: 1.0 vs 78 GFLOP/s on one thread, benchmarks/throughput.md). bf16 or fp32 force one.
    dtype: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"  # auto, cpu, cuda
    seed: int = 0
    log_every: int = 10  # steps
    eval_every: int = 100  # steps; 0 turns validation off
    eval_batches: int = 10
    ckpt_every: int = 100  # steps; a final checkpoint is always written
    keep_last: int = 3
    nonfinite: str = "skip"  # what a non-finite loss or gradient does: skip the step, or stop the run
    # A checkpoint folder (e.g. written by `dsmoe convert`) to start from. Its model config is used; ``model`` may
    # then only override the fields in INIT_OVERRIDES, which change no weight shapes.
    init_from: str | None = None
    trainable: str = "all"  # all, or routers: every other parameter frozen (and left out of the optimizer)

    def __post_init__(self) -> None:
        for name in (
            "seq_len",
            "micro_batch_size",
            "global_batch_tokens",
            "total_tokens",
            "log_every",
            "eval_batches",
            "keep_last",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.warmup_tokens < 0:
            raise ConfigError(f"warmup_tokens must be >= 0, got {self.warmup_tokens}")
        if self.warmup_tokens > self.total_tokens:
            warmup = self.total_tokens // 10
            warnings.warn(
                f"warmup_tokens={self.warmup_tokens:,} is more than total_tokens={self.total_tokens:,}, so the "
                f"learning rate would never reach lr={self.lr}; warming up over the first 10% "
                f"({warmup:,} tokens) instead: set warmup_tokens=N (at most total_tokens) to choose",
                stacklevel=3,
            )
            self.warmup_tokens = warmup
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"dtype must be 'auto', 'bf16' or 'fp32', got '{self.dtype}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got '{self.device}'")
        if self.nonfinite not in ("skip", "stop"):
            raise ConfigError(f"nonfinite must be 'skip' or 'stop', got '{self.nonfinite}'")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"trainable must be one of {', '.join(TRAINABLE)}, got '{self.trainable}'")
        if self.init_from is not None and not (Path(self.init_from) / "config.yaml").is_file():
            raise ConfigError(
                f"init_from={self.init_from} is not a dsmoe checkpoint folder (no config.yaml): point it "
                "at a folder written by `dsmoe convert` or `dsmoe train`"
            )
        if self.trainable == "routers":
            model_cfg = self.model_config()
            if not (model_cfg.has_att_router or model_cfg.has_mlp_router):
                raise ConfigError(
                    "trainable=routers, but the model has no routers (one expert per layer): "
                    "train with trainable=all or convert with more than one expert"
                )
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.seq_len > self.model_config().max_seq_len:
            raise ConfigError(
                f"seq_len={self.seq_len} exceeds the model's max_seq_len="
                f"{self.model_config().max_seq_len}: lower seq_len or set model.max_seq_len"
            )

    def model_config(self) -> ModelConfig:
        values = dict(self.model)
        if self.init_from is not None:
            from dsmoe.training.checkpoint import read_model_config

            fixed = sorted(set(values) - set(INIT_OVERRIDES))
            if fixed:
                raise ConfigError(
                    f"with init_from, the model config comes from {self.init_from}; model may only "
                    f"override {', '.join(INIT_OVERRIDES)}, not {', '.join(fixed)}"
                )
            return read_model_config(self.init_from).replace(**values)
        name = values.pop("preset", None)
        return preset(name, **values) if name else ModelConfig.from_dict(values)

    def accumulation_steps(self, world_size: int) -> int:
        per_micro = self.micro_batch_size * self.seq_len * world_size
        if self.global_batch_tokens % per_micro:
            raise ConfigError(
                f"global_batch_tokens={self.global_batch_tokens} is not a multiple of micro_batch_size x seq_len x "
                f"processes = {per_micro}: set global_batch_tokens to a multiple of {per_micro}"
            )
        return self.global_batch_tokens // per_micro

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / self.global_batch_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``lr=1e-3`` sets a trainer field, ``model.alpha_mlp=1e-3`` a model field."""
    values = {**values, "model": dict(values.get("model", {}))}
    train_keys = [f.name for f in dataclasses.fields(TrainConfig)]
    model_keys = [f.name for f in dataclasses.fields(ModelConfig)] + ["preset"]
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override '{item}' is not key=value (for example lr=1e-3 or model.alpha_mlp=1e-3)"
            )
        if key.startswith("model."):
            sub = key.removeprefix("model.")
            if sub not in model_keys:
                raise unknown_key_error(sub, model_keys, "the model section")
            values["model"][sub] = _parse_value(raw)
        elif key in train_keys:
            values[key] = _parse_value(raw)
        else:
            raise unknown_key_error(
                key, train_keys + [f"model.{k}" for k in model_keys], "the training config"
            )
    return values


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML run config holds, as written (no overrides, no checks of its keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return values


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    values = read_config_file(path) if path is not None else {}
    values = apply_overrides(values, list(overrides))
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in values:
        if key not in known:
            raise unknown_key_error(key, known, str(path or "the training config"))
    if values.get("init_from"):
        values.setdefault("model", {})
    for key in ("model", "data"):
        if key not in values or (not values[key] and not (key == "model" and values.get("init_from"))):
            raise ConfigError(f"the training config needs '{key}' (in the YAML or as {key}=... override)")
    model_keys = [f.name for f in dataclasses.fields(ModelConfig)] + ["preset"]
    for key in values["model"]:
        if key not in model_keys:
            raise unknown_key_error(key, model_keys, "the model section")
    return TrainConfig(**coerce_numbers(TrainConfig, values, str(path or "the training config")))
