"""The training loop: one CPU, one GPU, or many processes under torchrun with FSDP2."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from tqdm import tqdm

from dsmoe.config import ConfigError
from dsmoe.data.loader import TokenLoader
from dsmoe.model.transformer import Transformer
from dsmoe.training import checkpoint as ckpt
from dsmoe.training import sharded
from dsmoe.training.config import TrainConfig
from dsmoe.training.distributed import (
    DistInfo,
    all_reduce_mean,
    init_distributed,
    load_full_state_dicts,
)
from dsmoe.training.metrics import COLLAPSE_LOAD, MetricsLogger, collapsed_routers, router_metrics
from dsmoe.training.optim import build_optimizer, lr_at, set_lr
from dsmoe.training.resume import check_changes, find_checkpoint, say, set_aside_newer
from dsmoe.training.transforms import apply_transforms

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


class NonFiniteError(RuntimeError):
    pass


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")


def _autocast(cfg: TrainConfig, device: torch.device):
    if use_bf16(cfg, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: TrainConfig, info: DistInfo) -> Transformer:
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_config()).to(info.device)
    if cfg.init_from is not None:
        model.load_state_dict(ckpt.load_model_state(Path(cfg.init_from)), strict=True)
    if cfg.trainable == "routers":
        for name, p in model.named_parameters():
            p.requires_grad_(".router." in name)
    return apply_transforms(
        model,
        info,
        activation_checkpointing=cfg.activation_checkpointing,
        compile=cfg.compile,
        param_dtype=torch.bfloat16 if use_bf16(cfg, info.device) and info.device.type == "cuda" else None,
    )


def _nonfinite_culprit(model: torch.nn.Module) -> str:
    """The first parameter (hence layer) whose value or gradient is not finite."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return f"parameter {name} itself"
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"gradient of {name}"
    return "no parameter or gradient (the forward pass overflowed)"


def _same_tokenizer(saved: Path, current: Path) -> bool:
    """Whether two tokenizer.json files give the same token ids (compared in canonical form; missing counts as same)."""
    from tokenizers import Tokenizer

    if not (saved.is_file() and current.is_file()):
        return True
    return Tokenizer.from_file(str(saved)).to_str() == Tokenizer.from_file(str(current)).to_str()


@torch.no_grad()
def evaluate_loss(model, loader: TokenLoader, cfg: TrainConfig, info: DistInfo) -> float:
    model.eval()
    total, n = 0.0, 0
    for x, y in loader.iter_eval(cfg.eval_batches):
        with _autocast(cfg, info.device):
            total += float(model(x.to(info.device), y.to(info.device)).lm_loss)
        n += 1
    model.train()
    return float(all_reduce_mean(torch.tensor(total / max(n, 1)), info))


@dataclass
class StepResult:
    """One optimizer step: the mean over micro-batches of (loss, lm_loss, mi_att, mi_mlp, switch), the gradient norm
    before clipping, the learning rate, and the last micro-batch's output (its router records)."""

    sums: torch.Tensor
    total_norm: torch.Tensor
    lr: float
    out: Any


class Trainer:
    """One training run, in torchtitan's shape: ``__init__`` builds the run and restores a checkpoint, ``train_step``
    is one optimizer step, ``log``, ``evaluate`` and ``save`` what follows it, and ``run`` the loop over steps.

    ``resume``: continue from the newest checkpoint in ``out_dir`` that verifies (a new run when there is none);
    ``resume_from``: from that checkpoint folder. ``cfg`` must then equal the configuration saved with it except in
    ``resume.RESUME_CHANGEABLE``; each change is reported."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, resume_from: str | Path | None = None):
        self.cfg, self.info = cfg, init_distributed(cfg.device)
        self.out_dir = Path(cfg.out_dir)
        info = self.info
        source = (
            find_checkpoint(self.out_dir, resume_from, report=info.is_main) if resume or resume_from else None
        )
        changes = check_changes(source, cfg) if source is not None else {}
        if source is None and not resume and ckpt.list_checkpoints(self.out_dir):
            raise ConfigError(
                f"{self.out_dir} already holds checkpoints: pass --resume to continue that run, "
                "or choose another out_dir"
            )
        if info.is_main:
            ckpt.check_writable(self.out_dir)
            for key, (old, new) in changes.items():
                say(f"resume: {key} changes from {old} to {new}")
        self.model_cfg = cfg.model_config()
        self.accum = cfg.accumulation_steps(info.world_size)
        self.loader = TokenLoader(
            cfg.data,
            "train",
            cfg.micro_batch_size,
            cfg.seq_len,
            seed=cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
            vocab_size=self.model_cfg.vocab_size,
        )
        self.val_loader = (
            TokenLoader(
                cfg.data,
                "val",
                cfg.micro_batch_size,
                cfg.seq_len,
                seed=cfg.seed,
                vocab_size=self.model_cfg.vocab_size,
            )
            if cfg.eval_every > 0
            else None
        )
        self.model = build_model(cfg, info)
        self.optimizer = build_optimizer(self.model, cfg)
        self.step, self.tokens = 0, 0
        self.tokenizer_file = Path(cfg.data) / "tokenizer.json"
        if cfg.init_from is not None:
            init_tokenizer = Path(cfg.init_from) / "tokenizer.json"
            if not _same_tokenizer(init_tokenizer, self.tokenizer_file):
                raise ConfigError(
                    f"the data ({self.tokenizer_file.parent}) was tokenized with another tokenizer than "
                    f"init_from's ({init_tokenizer}): prepare the data with `dsmoe prepare --tokenizer "
                    f"{init_tokenizer}`"
                )
        if source is not None:
            self.restore(source)
        self.logger = MetricsLogger(self.out_dir, enabled=info.is_main)
        if source is not None:
            self.logger.log(self.step, {"event": "resume", "from": str(source), "changes": changes})
        elif info.is_main:
            self.logger.log(
                self.step,
                {
                    "event": "start",
                    "config": cfg.to_dict(),
                    "model": self.model_cfg.to_dict(),
                    "non_embedding_params": self.model_cfg.non_embedding_params,
                    "accumulation": self.accum,
                },
            )
        self.warned: set[tuple[str, int]] = set()  # routers already warned about for collapse

    def restore(self, source: Path) -> None:
        """Model, optimizer, step, tokens, data position and RNG from checkpoint ``source``."""
        cfg, info = self.cfg, self.info
        if not _same_tokenizer(source / "tokenizer.json", self.tokenizer_file):
            raise ConfigError(
                f"the tokenizer of the data ({self.tokenizer_file}) differs from the one the checkpoint was "
                f"trained with ({source / 'tokenizer.json'}): resume on data prepared with it"
            )
        state = ckpt.load_state(source / "trainer.pt")
        if ckpt.is_sharded(source):  # resharded to this run's ranks as it is read
            sharded.load_model_and_optimizer(source, self.model, self.optimizer)
        else:  # the single-file layout of checkpoints written before 2026-12 (and of `dsmoe convert`)
            optim_state = ckpt.load_state(source / "optimizer.pt")
            model_state = ckpt.load_model_state(source, check_hashes=False)
            load_full_state_dicts(self.model, self.optimizer, model_state, optim_state, info)
        self.step, self.tokens = state["step"], state["tokens"]
        if self.step > cfg.total_steps:
            raise ConfigError(
                f"total_tokens={cfg.total_tokens} ends the run at step {cfg.total_steps}, but {source} is at step "
                f"{self.step} ({self.tokens} tokens): raise total_tokens above {self.tokens}"
            )
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        if info.is_main:  # every process has read the checkpoint by now (loading is collective)
            for moved in set_aside_newer(self.out_dir, source):
                say(f"resume: a checkpoint newer than {source.name} is kept as {moved}")
            if self.step == cfg.total_steps:
                say(
                    f"{source} ends the run (total_tokens={cfg.total_tokens}); raise total_tokens to train further"
                )
            else:
                say(f"resuming {source} (step {self.step} of {cfg.total_steps})")

    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], bar: tqdm) -> StepResult:
        """One optimizer step over ``accum`` micro-batches; a non-finite loss or gradient skips the update (or stops
        the run, ``nonfinite: stop``), naming the micro-batch and the first non-finite parameter."""
        cfg, info, model, optimizer = self.cfg, self.info, self.model, self.optimizer
        lr = lr_at(self.tokens, cfg)
        set_lr(optimizer, lr)
        zero = torch.zeros((), device=info.device)
        # Loss terms stay on the device (no host sync per micro-batch): loss, lm_loss, mi_att, mi_mlp, switch.
        micro_values, positions = [], []
        for micro in range(self.accum):
            positions.append(self.loader.state_dict())
            x, y = next(batches)
            if info.world_size > 1 and hasattr(model, "set_requires_gradient_sync"):  # sharded by FSDP2
                fsdp = cast("FSDPModule", model)
                fsdp.set_requires_gradient_sync(micro == self.accum - 1)  # reduce-scatter once per step
            with _autocast(cfg, info.device):
                out = model(x.to(info.device), y.to(info.device))
            (out.loss / self.accum).backward()
            parts = (out.loss, out.lm_loss, out.mi_att, out.mi_mlp, out.switch)
            micro_values.append(torch.stack([p.detach().float() if p is not None else zero for p in parts]))
        values = torch.stack(micro_values)  # [accum, 5]
        sums = values.mean(dim=0)
        total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        total_norm = total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm
        # The one host sync of a step that does not log: whether its update may be applied.
        if not bool(torch.isfinite(sums[0]) & torch.isfinite(total_norm)):
            where = _nonfinite_culprit(model)
            bad = ", ".join(
                f"micro-batch {micro} (loader epoch {p['epoch']}, batch {p['position']})"
                for micro, p in enumerate(positions)
                if not bool(torch.isfinite(values[micro]).all())
            )
            bad = bad or "every micro-batch's loss was finite"
            message = (
                f"non-finite loss or gradient at step {self.step + 1} (loss {float(sums[0])}, grad norm "
                f"{float(total_norm)}); batches: {bad}; first non-finite: {where}"
            )
            optimizer.zero_grad(set_to_none=True)
            if cfg.nonfinite == "stop":
                raise NonFiniteError(
                    message + f"; the last good checkpoint in {self.out_dir / ckpt.CKPT_DIR} is kept"
                )
            if info.is_main:
                bar.write(f"warning: {message}; step skipped", file=sys.stderr)
            self.logger.log(self.step + 1, {"event": "skipped_step", "reason": message})
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += cfg.global_batch_tokens
        return StepResult(sums, total_norm, lr, out)

    def log(self, result: StepResult, elapsed: float, window_tokens: int, bar: tqdm) -> dict[str, Any]:
        """The step's metrics (averaged over the ranks) to metrics.jsonl and the bar; router collapse warned about
        once per router."""
        sums = all_reduce_mean(result.sums, self.info)
        last = {
            "loss": float(sums[0]),
            "lm_loss": float(sums[1]),
            "lr": result.lr,
            "grad_norm": float(result.total_norm),
            "tokens": self.tokens,
            "tokens_per_s": window_tokens / elapsed,
        }
        logged = {"dsmoe": ((2, "mi_att"), (3, "mi_mlp")), "smoe": ((4, "switch"),)}
        last.update({name: float(sums[i]) for i, name in logged.get(self.model_cfg.regime, ())})
        last.update(router_metrics(result.out.routers))
        n_experts = {"att": self.model_cfg.n_att_experts, "mlp": self.model_cfg.n_mlp_experts}
        for kind, layer, load in collapsed_routers(last):
            if (kind, layer) not in self.warned and self.info.is_main:
                self.warned.add((kind, layer))
                bar.write(
                    f"warning: router collapse in {kind} layer {layer}: one expert is the top choice of {load:.0%} "
                    f"of the tokens (max_load_{kind}; balanced: {1 / n_experts[kind]:.0%}, warned above "
                    f"{COLLAPSE_LOAD:.0%}); raise alpha (MI loss) or switch_loss_weight, or lower the learning rate",
                    file=sys.stderr,
                )
                self.logger.log(
                    self.step, {"event": "router_collapse", "kind": kind, "layer": layer, "load": load}
                )
        self.logger.log(self.step, last)
        bar.set_postfix(loss=f"{last['lm_loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        return last

    def evaluate(self, bar: tqdm) -> float:
        """Validation loss, logged."""
        assert self.val_loader is not None
        val_loss = evaluate_loss(self.model, self.val_loader, self.cfg, self.info)
        self.logger.log(self.step, {"val_loss": val_loss})
        if self.info.is_main:
            bar.write(f"step {self.step}: val_loss {val_loss:.4f}", file=sys.stderr)
        return val_loss

    def save(self, bar: tqdm) -> None:
        """A checkpoint of this step, then the old ones pruned (a prune that fails is a warning)."""
        trainer_state = {
            "step": self.step,
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "rng": ckpt.rng_state(),  # rank 0's, restored on every rank
        }
        written = ckpt.write_sharded_checkpoint(
            ckpt.step_dir(self.out_dir, self.step),
            self.model,
            self.optimizer,
            self.model_cfg,
            trainer_state=trainer_state,
            train_cfg=self.cfg.to_dict(),
            tokenizer_file=self.tokenizer_file,
        )
        if (
            written
            and self.info.is_main
            and (warning := ckpt.prune_checkpoints(self.out_dir, self.cfg.keep_last))
        ):
            bar.write(f"warning: {warning}", file=sys.stderr)
            self.logger.log(self.step, {"event": "prune_failed", "reason": warning})

    def run(self, max_steps: int | None = None) -> dict[str, Any]:
        """Steps until the run ends (or ``max_steps`` more, with a checkpoint); the last logged metrics."""
        cfg = self.cfg
        self.model.train()
        batches = iter(self.loader)
        last: dict[str, Any] = {}
        stop_at = cfg.total_steps if max_steps is None else min(cfg.total_steps, self.step + max_steps)
        bar = tqdm(
            total=cfg.total_steps, initial=self.step, disable=not self.info.is_main, desc="train", unit="step"
        )
        window_start, window_tokens = time.perf_counter(), 0
        while self.step < stop_at:
            result = self.train_step(batches, bar)
            window_tokens += cfg.global_batch_tokens
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == stop_at:
                last = self.log(result, time.perf_counter() - window_start, window_tokens, bar)
                window_start, window_tokens = time.perf_counter(), 0
            if self.val_loader is not None and (
                self.step % cfg.eval_every == 0 or self.step == cfg.total_steps
            ):
                last["val_loss"] = self.evaluate(bar)
            if self.step % cfg.ckpt_every == 0 or self.step == stop_at:
                self.save(bar)
        bar.close()
        self.logger.close()
        last.update(
            step=self.step, tokens=self.tokens, checkpoint=str(ckpt.step_dir(self.out_dir, self.step))
        )
        return last


def train(
    cfg: TrainConfig,
    resume: bool = False,
    max_steps: int | None = None,
    resume_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns the last logged metrics. ``resume`` and
    ``resume_from``: see ``Trainer``. ``max_steps`` stops early after that many optimizer steps in this call (the
    schedule still spans ``total_tokens``), with a checkpoint: how tests and time-boxed jobs split one run into
    pieces."""
    return Trainer(cfg, resume, resume_from).run(max_steps)
