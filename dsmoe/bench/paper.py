"""The paper's GPU tables (issue #32), one part at a time, as ``tools/gpu_paper.py`` runs them.

* ``inference(s, report)``: our Dense and DS-MoE of one paper size (``s.size``, full depth), and transformers' Llama
  at the Dense shape, taking turns in every round (``throughput.best_of``): input tokens/s, Table 5's latency (a batch
  of prompts plus a few new tokens, end to end through ``generate``, eager as the paper's transformers run was) and
  decode tokens/s at each decode batch, ours through the compiled decode step (under CUDA graphs on a GPU), the peer
  eager. The latency batch is scaled down where memory says so (``latency_batch``), and halved again on an
  out-of-memory error; the JSON says which batch ran and why.
* ``training(spec, report)``: tokens/s and model FLOP utilisation of training steps (bf16 autocast, each block
  compiled, AdamW), one preset after the other, the micro-batch from ``dsmoe plan``'s trace.

``report`` is called with the whole result so far after every measurement, so that a part cut off by its time limit
keeps what it measured.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dsmoe.bench.models import BenchModel, bench_models
from dsmoe.bench.settings import PAPER_SIZES, BenchSettings
from dsmoe.bench.throughput import (
    DTYPES,
    DSMoERunner,
    Runner,
    best_of,
    input_batch,
    machine,
    prepare_entry,
    runner_jobs,
)
from dsmoe.config import PRESETS, ConfigError, ModelConfig

Report = Callable[[dict], None]

# Table 5: DS-MoE's active MLP experts (of 32) at each size; attention runs dense, as in the paper's speed test.
TABLE5_TOP_K = {"3b": 6, "6b": 4}
PEER = "hf-llama"
# The latency's one timed round comes after a warm-up round at the same batch: a 6B round takes seconds per model.
LATENCY_REPEATS = 1
# Bytes kept free for what the estimates do not count (CUDA context, cuBLAS workspaces, allocator fragmentation).
GPU_HEADROOM = 0.08


def full_depth(size: str) -> int:
    """The layers of the paper's models of ``size`` (its Dense preset's; DS-MoE has as many)."""
    if size not in PAPER_SIZES:
        raise ConfigError(f"unknown size '{size}': choose one of {', '.join(PAPER_SIZES)}")
    return int(PRESETS[PAPER_SIZES[size][0]]["n_layers"])


def device_memory_gib(device: str) -> float | None:
    """The GPU's memory less the headroom, GiB; None on the CPU."""
    if device != "cuda":
        return None
    return torch.cuda.get_device_properties(0).total_memory * (1 - GPU_HEADROOM) / 2**30


# ---- inference ------------------------------------------------------------------------------------------------


def _weights_bytes(models: dict[str, torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters())


def latency_sequence_bytes(cfgs: list[ModelConfig], s: BenchSettings) -> int:
    """Bytes one latency prompt needs while a model generates (one model at a time): its KV cache, twice (the
    peer's cache grows by concatenation, so old and new live together for a moment), and the prefill's live
    activations per prompt token: the MLP's hidden (gate, up, activation and product: 4F) and the attention's and
    residual's tensors (8D), generously, at the widest of the models."""
    elem = DTYPES[s.dtype].itemsize
    tokens = s.latency_prompt + s.latency_new
    kv = max(2 * c.n_layers * c.n_kv_heads * c.head_dim for c in cfgs) * elem * tokens * 2
    widest = max(c.n_mlp_experts * c.d_expert for c in cfgs)
    activations = s.latency_prompt * elem * (4 * widest + 8 * s.width)
    return kv + activations


def latency_batch(s: BenchSettings, models: dict[str, torch.nn.Module], cfgs: list[ModelConfig]) -> dict:
    """The latency batch: ``s.latency_batch`` prompts, or fewer where the weights of every model in the run and the
    prompts' cache and activations would not fit ``s.memory_gb``; the numbers behind the choice."""
    budget = s.memory_gb * 2**30 - _weights_bytes(models)
    per_sequence = latency_sequence_bytes(cfgs, s)
    fits = int(budget // per_sequence)
    if fits < 1:
        raise ConfigError(
            f"--memory-gb {s.memory_gb:g} holds the models' weights ({_weights_bytes(models) / 2**30:.1f} GiB) "
            f"but not one latency prompt ({per_sequence / 2**30:.2f} GiB): shorten the prompt or drop a model"
        )
    batch = min(s.latency_batch, fits)
    return {
        "requested": s.latency_batch,
        "planned": batch,
        "budget_gib": round(s.memory_gb, 2),
        "weights_gib": round(_weights_bytes(models) / 2**30, 2),
        "per_prompt_gib": round(per_sequence / 2**30, 3),
        "scaled": None
        if batch == s.latency_batch
        else f"{s.latency_batch} prompts would need {s.latency_batch * per_sequence / 2**30:.1f} GiB beside the "
        f"weights, {budget / 2**30:.1f} GiB are left: {batch} prompts",
    }


def halving_on_oom(measure: Callable[[int], dict], batch: int, notes: list[str]) -> tuple[int, dict]:
    """``measure(batch)``, the batch halved after each out-of-memory error (noted) until it fits."""
    while True:
        try:
            return batch, measure(batch)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            notes.append(f"out of memory at batch {batch}: halved to {batch // 2}")
            batch //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


@dataclass
class Cast:
    """The models of one inference part: ours (Dense, DS-MoE) and the peer, with the runners that time them."""

    entries: list[BenchModel]
    models: dict[str, Any]  # every model in the run, the peer's included (its weights count against memory)
    eager: dict[str, Runner]  # input throughput and latency
    decoding: dict[str, Runner]  # decode throughput: ours compiled, the peer eager
    peer: dict[str, Any] | None


def build_cast(s: BenchSettings) -> Cast:
    entries = [
        e
        for e in bench_models(
            s.width, s.n_layers, s.vocab_size, s.max_seq_len, s.mlp_k, s.att_k, s.shape, s.size
        )
        if e.name in s.models
    ]
    ready = {e.name: prepare_entry(s, entries, i) for i, e in enumerate(entries)}
    models: dict[str, Any] = {name: p.model for name, p in ready.items()}
    eager: dict[str, Runner] = {n: DSMoERunner(p.model, s.device, p.plan) for n, p in ready.items()}
    decoding: dict[str, Runner] = {
        n: DSMoERunner(p.model, s.device, p.plan, compile=True) for n, p in ready.items()
    }
    peer = None
    if s.peers:
        from dsmoe.bench.peers import HFRunner, build_peers

        (built,) = build_peers([e for e in entries if e.name == "dense"], models, s.device, DTYPES[s.dtype])
        models[PEER] = built.model
        eager[PEER] = decoding[PEER] = HFRunner(built.model, s.device)
        peer = {
            **built.describe(),
            "total_params": built.total_params,
            "active_params": built.active_params,
        }
    return Cast(entries, models, eager, decoding, peer)


def _ratios(figures: dict[str, dict], baseline: str) -> dict[str, dict[str, float]]:
    """Every row's figures over ``baseline``'s, for the measures both have."""
    base = figures[baseline]
    return {
        name: {k: v / base[k] for k, v in row.items() if k in base and isinstance(v, float)}
        for name, row in figures.items()
    }


def inference(s: BenchSettings, report: Report) -> dict:
    """One inference part (see the module's docstring)."""
    s.check()
    torch.manual_seed(s.seed)
    cast = build_cast(s)
    figures: dict[str, dict] = {name: {} for name in cast.eager}
    notes: list[str] = []
    result: dict[str, Any] = {
        "settings": asdict(s),
        "machine": machine(s.device),
        "models": figures,
        "shapes": {e.name: e.cfg.to_dict() for e in cast.entries},
        "sparse_settings": {e.name: e.mlp.describe() if e.mlp else "dense" for e in cast.entries},
        "decode": {
            "ours": "compiled step" + (" under CUDA graphs" if s.device == "cuda" else ""),
            PEER: "eager",
        },
        "latency_mode": "eager, every model (as the paper's transformers run)",
        "notes": notes,
        "ratios": "each figure over the other model's; latency_s below 1 is faster",
    }
    if cast.peer is not None:
        result["peer"] = cast.peer

    def update(**sections: Any) -> None:
        result.update(sections)
        result["ratios_to_dense"] = _ratios(figures, "dense")
        if cast.peer is not None:
            result["dense_over_peer"] = _ratios(figures, PEER)["dense"]
        report(result)

    gen = torch.Generator().manual_seed(s.seed)
    tokens = lambda *shape: torch.randint(0, s.vocab_size, shape, generator=gen).to(s.device)  # noqa: E731

    def measure_input(batch: int) -> dict:
        x = tokens(batch, s.input_len)
        what = f"input throughput, batch {batch} x {s.input_len}"
        return best_of(runner_jobs(cast.eager, "forward", x), s.repeats, s.device, what)

    batch, times = halving_on_oom(measure_input, input_batch(s, cast.models), notes)
    for name, t in times.items():
        figures[name]["input_tps"] = batch * s.input_len / t
    update(input_batch=batch)

    plan = latency_batch(s, cast.models, [e.cfg for e in cast.entries])

    def measure_latency(batch: int) -> dict:
        prompts = tokens(batch, s.latency_prompt)
        what = f"latency, {batch} prompts of {s.latency_prompt} + {s.latency_new} new tokens"
        jobs = runner_jobs(cast.eager, "generate", prompts, s.latency_new)
        return best_of(jobs, LATENCY_REPEATS, s.device, what)

    batch, times = halving_on_oom(measure_latency, plan["planned"], notes)
    for name, t in times.items():
        figures[name]["latency_s"] = t
    update(latency_batch={**plan, "ran": batch})

    for batch in s.decode_batches:
        prompt = tokens(batch, s.decode_prompt)
        what = f"decode throughput, batch {batch} x {s.decode_tokens} tokens"
        jobs = runner_jobs(cast.decoding, "decode", prompt, s.decode_tokens)
        for name, t in best_of(jobs, s.repeats, s.device, what).items():
            figures[name][f"output_tps_b{batch}"] = batch * s.decode_tokens / t
        update()
    return result


def inference_settings(
    size: str, *, dry_run: bool, device: str, memory_gb: float | None = None
) -> BenchSettings:
    """The settings of one size's inference part: the paper's (full depth, Table 5's latency, bf16) on a GPU; for a
    dry run, tiny shapes that take the same path on the CPU in seconds."""
    top_k = TABLE5_TOP_K.get(size)
    if top_k is None:
        raise ConfigError(f"Table 5 has sizes {', '.join(TABLE5_TOP_K)}, not '{size}'")
    common: dict[str, Any] = dict(
        device=device, shape="llama", peers=True, models=["dense", "ds-moe"], mlp_k=top_k, decode="compiled"
    )
    if dry_run:  # decode at batch 2: the compiled step's custom ops, CUDA's path (batch 1 on a CPU gathers)
        return BenchSettings(
            **common, dtype="fp32", size="toy", d_model=64, n_layers=2, vocab_size=512, input_len=32,
            memory_gb=memory_gb or 2.0, max_input_batch=4, latency_batch=4, latency_prompt=24, latency_new=3,
            decode_batches=(2,), decode_tokens=3, decode_prompt=8, repeats=1,
        )  # fmt: skip
    from dsmoe.config import CODEGEN_VOCAB

    return BenchSettings(
        **common, dtype="bf16", size=size, n_layers=full_depth(size), vocab_size=CODEGEN_VOCAB, input_len=256,
        memory_gb=memory_gb or device_memory_gib(device) or 16.0, max_input_batch=256, latency_batch=64,
        latency_prompt=2000, latency_new=20, decode_batches=(1, 16, 64), decode_tokens=64, decode_prompt=64,
        repeats=2,
    )  # fmt: skip


# ---- training -------------------------------------------------------------------------------------------------

# Dense bf16 peak of each GPU (tensor cores, no sparsity), FLOP/s, by a name fragment of torch.cuda.get_device_name();
# the first fragment found in the name wins, so the more specific names come first.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def peak_flops(gpu_name: str | None) -> float | None:
    """The GPU's dense bf16 peak, FLOP/s, or None for a device not in PEAK_BF16 (the CPU included)."""
    if gpu_name is None:
        return None
    return next((peak for fragment, peak in PEAK_BF16 if fragment in gpu_name), None)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward and backward) as computed: 6 per weight of every matrix product, and
    DS-MoE's dense training multiplies every expert and every attention expert (and the routers), so all non-embedding
    parameters count, with the LM head; plus the attention scores and their mix, 12 * layers * query width * sequence
    length (the full square, as PaLM's MFU counts it, though causal kernels skip half)."""
    products = (
        cfg.non_embedding_params + cfg.vocab_size * cfg.d_model
    )  # the embedding lookup multiplies nothing
    return 6 * products + 12 * cfg.n_layers * cfg.n_query_heads * cfg.head_dim * seq_len


@dataclass
class TrainSpec:
    presets: tuple[str, ...] = ("dense-1b", "ds-moe-1b")
    seq_len: int = 2048
    micro_batch: int | None = None  # None: the largest that `dsmoe plan`'s trace fits in budget_gib
    budget_gib: float = 75.0
    warmup_steps: int = 2  # compiling, the allocator's first growth
    steps: int = 3
    device: str = "cuda"
    dtype: str = "bf16"
    compile: bool = True
    model_overrides: dict[str, Any] | None = None  # a dry run's tiny shape

    def check(self) -> None:
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise ConfigError(f"unknown preset(s) {', '.join(unknown)}: choose from {', '.join(PRESETS)}")
        for name in ("seq_len", "steps", "warmup_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ConfigError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"dtype must be bf16 or fp32, got {self.dtype}")


def _train_config(spec: TrainSpec, preset_name: str, micro_batch: int):
    from dsmoe.training.config import TrainConfig
    from dsmoe.training.plan_commands import PRESET_GLOBAL_BATCH

    return TrainConfig(
        model={"preset": preset_name, **(spec.model_overrides or {})},
        data="(none: random tokens)",
        seq_len=spec.seq_len,
        micro_batch_size=micro_batch,
        global_batch_tokens=max(PRESET_GLOBAL_BATCH, micro_batch * spec.seq_len),
        compile=spec.compile,
        device=spec.device,
        dtype=spec.dtype,
    )


def planned_micro_batch(spec: TrainSpec, preset_name: str) -> dict:
    """The largest micro-batch whose training step `dsmoe plan` traces within ``spec.budget_gib`` (one GPU, no
    activation checkpointing, bf16 autocast), with the traced peak."""
    from dsmoe.training.plan import fit

    started = time.perf_counter()
    found = fit(
        _train_config(spec, preset_name, 1), 1, int(spec.budget_gib * 2**30), False, spec.dtype == "bf16"
    )
    if found.largest_micro_batch == 0:
        raise ConfigError(f"{preset_name}: not one sequence of {spec.seq_len} fits {spec.budget_gib:g} GiB")
    return {
        "micro_batch": found.largest_micro_batch,
        "traced_peak_gib": round((found.peak_at_largest or 0) / 2**30, 2),
        "budget_gib": spec.budget_gib,
        "plan_seconds": round(time.perf_counter() - started, 1),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _train_steps(spec: TrainSpec, preset_name: str, micro_batch: int) -> tuple[list[float], list[float], int]:
    """Seconds of each timed step, the losses of all steps, and the peak memory (bytes; 0 on the CPU)."""
    from dsmoe.training.distributed import DistInfo
    from dsmoe.training.loop import build_model
    from dsmoe.training.optim import build_optimizer

    cfg = _train_config(spec, preset_name, micro_batch)
    device = torch.device(spec.device)
    model = build_model(cfg, DistInfo(device=device))
    optimizer = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, model.cfg.vocab_size, (micro_batch, spec.seq_len + 1), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if spec.dtype == "bf16" else None
    if spec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [], []
    for step in range(spec.warmup_steps + spec.steps):
        _sync(spec.device)
        start = time.perf_counter()
        with autocast or contextlib.nullcontext():
            out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(spec.device)
        if step >= spec.warmup_steps:
            seconds.append(time.perf_counter() - start)
        losses.append(float(out.loss.detach()))
    peak = torch.cuda.max_memory_allocated() if spec.device == "cuda" else 0
    return seconds, losses, peak


def training(spec: TrainSpec, report: Report) -> dict:
    """Training tokens/s and MFU of each preset in turn (both at once would not fit: each one's micro-batch is
    planned for the whole GPU)."""
    spec.check()
    gpu = torch.cuda.get_device_name() if spec.device == "cuda" else None
    peak = peak_flops(gpu)
    rows: dict[str, dict] = {}
    result: dict[str, Any] = {
        "spec": asdict(spec),
        "machine": machine(spec.device),
        "gpu": gpu,
        "peak_bf16_flops": peak,
        "flops": "6 x (every non-embedding parameter, all experts, + LM head) + 12 x layers x query width x seq",
        "models": rows,
    }
    for name in spec.presets:
        plan = (
            {"micro_batch": spec.micro_batch, "given": True}
            if spec.micro_batch is not None
            else planned_micro_batch(spec, name)
        )
        micro_batch = plan["micro_batch"]
        seconds, losses, peak_bytes = _train_steps(spec, name, micro_batch)
        cfg = _train_config(spec, name, micro_batch).model_config()
        tokens_per_s = micro_batch * spec.seq_len / statistics.median(seconds)
        flops = training_flops_per_token(cfg, spec.seq_len)
        rows[name] = {
            "plan": plan,
            "tokens_per_step": micro_batch * spec.seq_len,
            "step_seconds": seconds,
            "tokens_per_s": tokens_per_s,
            "flops_per_token": flops,
            "model_tflops_per_s": tokens_per_s * flops / 1e12,
            "mfu": tokens_per_s * flops / peak if peak else None,
            "losses": losses,
            "peak_memory_gib": round(peak_bytes / 2**30, 2),
            "total_params": cfg.total_params,
        }
        if spec.device == "cuda":
            torch.cuda.empty_cache()
        if len(rows) > 1 and spec.presets[0] in rows:
            first = rows[spec.presets[0]]["tokens_per_s"]
            result["tokens_per_s_over_first"] = {n: r["tokens_per_s"] / first for n, r in rows.items()}
        report(result)
    return result


def train_spec(*, dry_run: bool, device: str) -> TrainSpec:
    """The training part's spec: ``ds-moe-1b`` and ``dense-1b``, 24 layers, sequences of 2,048, compiled bf16 steps on
    a GPU; for a dry run, two layers of a narrow width, short sequences, eager fp32 on the CPU."""
    if dry_run:
        tiny = dict(d_model=64, n_layers=2, head_dim=8, vocab_size=512, max_seq_len=64)
        # a budget of a few tiny micro-batches: the plan's trace runs as on a GPU
        return TrainSpec(
            seq_len=32, budget_gib=0.05, warmup_steps=1, steps=2, device=device, dtype="fp32", compile=False,
            model_overrides=tiny,
        )  # fmt: skip
    return TrainSpec(device=device)
