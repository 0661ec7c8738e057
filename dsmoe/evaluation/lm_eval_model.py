"""lm-evaluation-harness model type ``dsmoe``: a dsmoe checkpoint under any sparse-inference setting.

Importing this module registers the model. lm-eval 0.4.13 discovers models only through its own hard-coded table
(no plugin entry points), so from a shell use ``dsmoe lm-eval ARGS``: the ``lm_eval`` command with this module
imported first, same arguments::

    dsmoe lm-eval --model dsmoe --model_args checkpoint=DIR,strategy=topk,k=4 --tasks wikitext --device cpu
    dsmoe lm-eval --model dsmoe --model_args checkpoint=DIR,settings=settings.json ...   # per layer (dsmoe tune)

In Python: ``import dsmoe.evaluation.lm_eval_model`` then ``lm_eval.simple_evaluate(model="dsmoe", ...)``.
Tokenization follows lm-eval's ``TemplateLM`` (the same context/continuation split as its ``hf`` model); scoring and
rolling windows are dsmoe's batched ones (``scoring.py``, ``perplexity.py``). Every token the model processes is
counted by an ``ActiveMeter``: ``active_summary()`` and the ``config`` section of lm-eval's results report it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

# lm-eval fills its model registry with the built-in types only while the registry is empty: fill it before
# registering `dsmoe`, or `hf` and the others would disappear from the same process.
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from dsmoe.config import ConfigError
from dsmoe.evaluation.perplexity import rolling_loglikelihoods
from dsmoe.evaluation.scoring import score_requests
from dsmoe.inference.generate import generate
from dsmoe.inference.meter import ActiveMeter
from dsmoe.model.plan import SparsePlan, Spelling
from dsmoe.model.settings_file import load_plan

log = logging.getLogger(__name__)


def _optional(value, kind):
    return None if value in (None, "", "None", "none") else kind(value)


def resolve_device(device: str | None) -> torch.device:
    """lm-eval's CLI defaults to cuda:0; fall back to the CPU (with a warning) where there is no GPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: running on the CPU", device)
        return torch.device("cpu")
    return torch.device(device)


def resolve_batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """An integer, or 'auto' / 'auto:N' which use ``max_batch_size`` (default 64): no memory probing on CPUs."""
    if batch_size is None:
        return 1
    text = str(batch_size)
    if text.startswith("auto"):
        return int(max_batch_size or 64)
    size = int(text)
    if size < 1:
        raise ConfigError(f"batch_size must be >= 1 or 'auto', got {batch_size!r}")
    return size


def _model_arg(field: str) -> str:
    """How --model_args spells a plan field: 'mlp_k' -> 'k', 'att_k' -> 'att_k', 'normalize_weights' -> 'normalize'."""
    return "normalize" if field == "normalize_weights" else field.removeprefix("mlp_")


MODEL_ARGS = Spelling(_model_arg, "--model_args", text=True, how="add {name}=N to --model_args")


@register_model("dsmoe")
class DSMoELM(TemplateLM):
    """A dsmoe checkpoint as an lm-eval ``LM``. Sparse settings mirror ``dsmoe eval``'s flags: ``strategy``, ``k``,
    ``threshold`` for the MLP routers and ``att_strategy``, ``att_k``, ``att_threshold`` for attention;
    ``normalize`` rescales selected scores to sum to one. Without a strategy the layers run as trained (an SMoE
    its top-k); ``strategy=dense`` runs every expert. ``settings=FILE``: per-layer settings from a settings file
    (``dsmoe tune``) instead of the strategy arguments."""

    def __init__(
        self,
        checkpoint: str,
        strategy: str | None = None,
        k: int | None = None,
        threshold: float | None = None,
        att_strategy: str | None = None,
        att_k: int | None = None,
        att_threshold: float | None = None,
        normalize: bool = False,
        settings: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **unused,
    ):
        super().__init__()
        if unused:
            log.warning("dsmoe model ignores arguments it does not know: %s", ", ".join(sorted(unused)))
        from dsmoe.data.tokenizer import eos_id
        from dsmoe.inference.prepare import prepare
        from dsmoe.training.checkpoint import checkpoint_config

        cfg = checkpoint_config(checkpoint)
        given = {
            "att_strategy": att_strategy,
            "att_k": att_k,
            "att_threshold": att_threshold,
            "mlp_strategy": strategy,
            "mlp_k": k,
            "mlp_threshold": threshold,
        }
        if settings not in (None, ""):
            named = [_model_arg(field) for field, value in given.items() if value not in (None, "")]
            if named:
                raise ConfigError(
                    f"settings={settings} gives every layer's setting; drop {', '.join(named)} from --model_args"
                )
            plan = load_plan(str(settings), cfg)
        else:
            plan = SparsePlan.parse({**given, "normalize_weights": normalize}, cfg, MODEL_ARGS)
        self._device = resolve_device(device)
        torch_dtype = getattr(torch, dtype) if dtype not in (None, "auto") else None
        prepared = prepare(Path(checkpoint), plan, device=self._device, dtype=torch_dtype)
        self.model, self.tokenizer, self.plan = prepared.model, prepared.tokenizer, prepared.plan
        if self.tokenizer is None:
            raise ConfigError(
                f"checkpoint {checkpoint} has no tokenizer.json: lm-eval needs text -> token ids"
            )
        self._eot = eos_id(self.tokenizer)
        self.cfg = self.model.cfg
        self.max_length = int(max_length or self.cfg.max_seq_len)
        if not 1 <= self.max_length <= self.cfg.max_seq_len:
            raise ConfigError(
                f"max_length={self.max_length} must be in 1..{self.cfg.max_seq_len} (max_seq_len)"
            )
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = resolve_batch_size(batch_size, _optional(max_batch_size, int))
        self.meter = ActiveMeter(self.cfg)
        self.checkpoint = str(checkpoint)

    # --- what TemplateLM needs -----------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return f"dsmoe:{self.checkpoint}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Score each continuation after its context, keeping at most ``max_length`` input tokens (the context is
        cut from the left, as lm-eval's hf model does)."""
        scored = []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValueError("lm-eval sent an empty continuation; it has no token to score")
            ids = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1) :]
            scored.append((ids, min(len(continuation_enc), len(ids) - 1)))
        scores = score_requests(
            self.model,
            scored,
            self.batch_size,
            self._device,
            pad_id=self._eot,
            progress=not disable_tqdm,
            plan=self.plan,
            meter=self.meter,
        )
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(req.args[0]) for req in requests]
        nonempty = [i for i, d in enumerate(docs) if d]
        totals = rolling_loglikelihoods(
            self.model,
            [docs[i] for i in nonempty],
            self.prefix_token_id,
            self.max_length,
            self.batch_size,
            self._device,
            progress=not disable_tqdm,
            plan=self.plan,
            meter=self.meter,
        )
        out = [0.0] * len(docs)  # an empty document has log-likelihood 0 (no token to predict)
        for i, total in zip(nonempty, totals, strict=True):
            out[i] = total
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations cut at the first stop string. Requests with the same
        prompt length and generation settings share a batch (``generate`` takes equal-length prompts)."""
        from tqdm import tqdm

        jobs = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            until, max_new, temperature, top_p = self._generation_settings(gen_kwargs)
            budget = self.max_length - max_new
            if budget < 1:
                raise ConfigError(
                    f"max_gen_toks={max_new} leaves no room for a prompt in {self.max_length} tokens"
                )
            ids = (self.tok_encode(context) or [self.prefix_token_id])[-budget:]
            jobs.append((i, ids, until, max_new, temperature, top_p))
        groups: dict[tuple, list] = {}
        for job in jobs:
            groups.setdefault((len(job[1]), job[3], job[4], job[5]), []).append(job)
        out = [""] * len(requests)
        with tqdm(total=len(jobs), desc="generating", disable=disable_tqdm) as bar:
            for (length, max_new, temperature, top_p), group in sorted(
                groups.items(), key=lambda kv: -kv[0][0]
            ):
                for start in range(0, len(group), self.batch_size):
                    chunk = group[start : start + self.batch_size]
                    prompt = torch.tensor([job[1] for job in chunk], device=self._device)
                    tokens = generate(
                        self.model,
                        prompt,
                        max_new,
                        temperature=temperature,
                        top_p=top_p,
                        eos_token_id=self._eot,
                        plan=self.plan,
                        meter=self.meter,
                    )
                    for job, row in zip(chunk, tokens[:, length:].tolist(), strict=True):
                        if self._eot in row:
                            row = row[: row.index(self._eot)]
                        out[job[0]] = cut_at_stop(self.tok_decode(row), job[2])
                    bar.update(len(chunk))
        return out

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, float, float]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        return until, max_new, temperature if do_sample else 0.0, top_p

    # --- what dsmoe adds ------------------------------------------------------------------------------------------

    def active_summary(self) -> dict:
        """The meter's figures (``dsmoe.inference.meter``) over every token scored or generated so far."""
        return {
            "att_strategy": self.plan.describe("att"),
            "mlp_strategy": self.plan.describe("mlp"),
            **self.meter.summary(),
        }

    def get_model_info(self) -> dict:
        info: dict[str, str | float] = {
            "dsmoe_checkpoint": self.checkpoint,
            "dsmoe_att_strategy": self.plan.describe("att"),
            "dsmoe_mlp_strategy": self.plan.describe("mlp"),
        }
        if all(n > 0 for kind in ("att", "mlp") for n in self.meter.tokens[kind]):
            info.update(
                dsmoe_active_params=self.meter.active_params,
                dsmoe_active_share=self.meter.active_share,
                dsmoe_active_hidden=self.meter.active_hidden,
                dsmoe_non_embedding_params=self.cfg.non_embedding_params,
            )
        return info


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]
