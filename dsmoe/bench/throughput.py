"""Latency and token throughput of Dense vs SMoE vs DS-MoE, all measured in one process (paper sec. 4.4).

* latency: a batch of prompts plus a few generated tokens, end to end through ``generate``;
* input throughput: forward passes over sequences of ``input_len`` tokens, the batch as large as the memory budget
  allows (capped to keep CPU runs short);
* output throughput: ``decode_tokens`` tokens decoded one step at a time with the KV cache, at each decode batch;
* MLP FLOP/s: the dense MLP path and the sparse expert paths on the same token count (see ``mlp_flops``);
* memory bandwidth: this machine's read limit (a streaming sum), torch's matrix-vector read rate and its copy rate,
  measured in the same run, and for batch-1 decode the bytes of weights each token reads (active parameters and the
  LM head) times tokens/s, as a share of the read limit: how close decoding comes to it (see ``bandwidth``).

Our models decode eagerly or through the compiled decode step (``--decode compiled``; ``both`` adds a "+compiled"
row per model), see ``dsmoe.inference.generate.Decoder``; the prefill (input throughput) is eager either way.

Timings are the best of ``repeats`` rounds, the models taking turns within each round so that load from other
processes hits all of them alike. Ratios divide each model's figure by the Dense model's from the same run.

With ``peers`` (and the ``llama`` shape), transformers' Llama and OLMoE at the same shapes join the same rounds
(``dsmoe.bench.peers``), and each of our Dense and DS-MoE models is also divided by its peer (``peer_ratios``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dsmoe.bench.models import BenchModel, bench_models
from dsmoe.bench.settings import BenchSettings
from dsmoe.config import ConfigError
from dsmoe.inference.generate import Decoder, generate
from dsmoe.inference.meter import ActiveMeter
from dsmoe.inference.prepare import Prepared, prepare
from dsmoe.model.plan import SparsePlan
from dsmoe.model.routing import route
from dsmoe.model.settings import Kernels
from dsmoe.model.transformer import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], float | None], device: str) -> float:
    """Seconds taken by fn, or the seconds fn reports itself (when only part of it is the measured work)."""
    _sync(device)
    start = time.perf_counter()
    reported = fn()
    _sync(device)
    return reported if reported is not None else time.perf_counter() - start


def best_of(
    jobs: dict[str, Callable[[], float | None]], repeats: int, device: str, what: str = ""
) -> dict[str, float]:
    """Best time of each job over ``repeats`` rounds, jobs taking turns; one untimed warm-up round first."""
    if what:
        print(f"bench: {what}", file=sys.stderr, flush=True)
    for fn in jobs.values():
        fn()
    best = {name: float("inf") for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            best[name] = min(best[name], _timed(fn, device))
    return best


def input_batch(s: BenchSettings, models: Mapping[str, nn.Module]) -> int:
    """Largest batch of ``input_len`` sequences whose activations fit the budget beside all models' weights."""
    elem = DTYPES[s.dtype].itemsize
    weights = sum(p.numel() for m in models.values() for p in m.parameters()) * elem
    # live activations per token, generously: residual, norms, q/k/v/o (~8 D) and the widest MLP hidden (4 D) x2
    per_sequence = s.input_len * elem * 16 * s.width
    fits = int((s.memory_gb * 2**30 - weights) // per_sequence)
    if fits < 1:
        raise ConfigError(
            f"--memory-gb {s.memory_gb} does not hold the models' weights ({weights / 2**30:.2f} GiB) "
            "and one sequence: raise --memory-gb, or pick a smaller --size (or --d-model)"
        )
    return min(fits, s.max_input_batch)


class Runner(Protocol):
    """One model behind the three timed jobs; ours (``DSMoERunner``) and transformers' (``peers.HFRunner``)."""

    @property
    def module(self) -> nn.Module:
        """The model (its parameters size the input batch)."""
        ...

    def forward(self, idx_BT: torch.Tensor) -> None:
        """A forward pass over ``idx_BT``, logits of the last position only."""

    def decode(self, prompt_BT: torch.Tensor, n_tokens: int) -> float:
        """Prefill ``prompt_BT`` into a fresh KV cache, then decode ``n_tokens`` greedily one step at a time;
        returns the seconds of the decode steps."""
        ...

    def generate(self, prompt_BT: torch.Tensor, n_new: int) -> None:
        """``n_new`` greedy tokens after each prompt, end to end through the model's generate."""


class DSMoERunner:
    def __init__(self, model: Transformer, device: str, plan: SparsePlan, compile: bool = False):
        self.module = model
        self.device = device
        self.plan = plan
        self.compile = compile

    def forward(self, idx_BT: torch.Tensor) -> None:
        self.module(idx_BT, plan=self.plan, last_only=True)

    def decode(self, prompt_BT: torch.Tensor, n_tokens: int) -> float:
        batch, prompt_len = prompt_BT.shape
        decoder = Decoder(self.module, batch, prompt_len + n_tokens, plan=self.plan, compile=self.compile)
        token = decoder.prefill(prompt_BT).argmax(-1)
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(n_tokens):
            token = decoder.step(token).argmax(-1)
        _sync(self.device)
        return time.perf_counter() - start

    def generate(self, prompt_BT: torch.Tensor, n_new: int) -> None:
        generate(self.module, prompt_BT, n_new, plan=self.plan, compile=self.compile)


def runner_jobs(
    runners: Mapping[str, Runner], method: str, *args: Any
) -> dict[str, Callable[[], float | None]]:
    """Each runner's ``method(*args)`` as a job for ``best_of``, under inference mode."""

    def job(runner: Runner) -> Callable[[], float | None]:
        def timed() -> float | None:
            with torch.inference_mode():
                return getattr(runner, method)(*args)

        return timed

    return {name: job(runner) for name, runner in runners.items()}


def measure_models(s: BenchSettings, runners: dict[str, Runner]) -> tuple[dict, torch.Tensor]:
    """Timed figures of every model, and the input-throughput batch (for the active-parameter meter). All models
    see the same inputs."""
    gen = torch.Generator().manual_seed(s.seed)
    results: dict[str, dict] = {name: {} for name in runners}
    batch_in = input_batch(s, {n: r.module for n, r in runners.items()})
    x_in = torch.randint(0, s.vocab_size, (batch_in, s.input_len), generator=gen).to(s.device)

    times = best_of(
        runner_jobs(runners, "forward", x_in),
        s.repeats,
        s.device,
        f"input throughput, batch {batch_in} x {s.input_len}",
    )
    for name, t in times.items():
        results[name]["input_tps"] = batch_in * s.input_len / t
    for batch in s.decode_batches:
        prompt = torch.randint(0, s.vocab_size, (batch, s.decode_prompt), generator=gen).to(s.device)
        times = best_of(
            runner_jobs(runners, "decode", prompt, s.decode_tokens),
            s.repeats,
            s.device,
            f"output throughput, batch {batch} x {s.decode_tokens} tokens",
        )
        for name, t in times.items():
            results[name][f"output_tps_b{batch}"] = batch * s.decode_tokens / t
    prompts = torch.randint(0, s.vocab_size, (s.latency_batch, s.latency_prompt), generator=gen).to(s.device)
    times = best_of(
        runner_jobs(runners, "generate", prompts, s.latency_new),
        s.repeats,
        s.device,
        f"latency, {s.latency_batch} prompts of {s.latency_prompt} + {s.latency_new} new tokens",
    )
    for name, t in times.items():
        results[name]["latency_s"] = t
    return {"input_batch": batch_in, "models": results}, x_in


def active_params(entry: BenchModel, model: Transformer, x_in: torch.Tensor) -> dict[str, int]:
    """Active parameters of one of our models, measured by the meter on the input batch, and its totals."""
    meter = ActiveMeter(entry.cfg)
    with torch.inference_mode():
        meter.update(model(x_in[:1], plan=entry.plan, last_only=True).routers)
    return dict(
        active_params=round(meter.active_params),
        total_params=entry.cfg.non_embedding_params,
        embedding_params=entry.cfg.embedding_params,
    )


def mlp_flops(s: BenchSettings, entries: list[BenchModel], models: dict[str, Transformer]) -> dict:
    """GFLOP/s of the first layer's MLP on ``mlp_tokens`` tokens: Dense's dense path, the MoE models' sparse
    paths on the fast kernels and on the reference kernels. FLOPs count only the multiply-adds actually needed:
    2 * tokens_routed * D * (F_in + F) per expert pair."""
    gen = torch.Generator().manual_seed(s.seed + 1)
    dtype = DTYPES[s.dtype]
    x = torch.randn(s.mlp_tokens, s.width, generator=gen).to(device=s.device, dtype=dtype)
    jobs: dict[str, Callable[[], float | None]] = {}
    flops: dict[str, int] = {}
    for e in entries:
        if e.att is not None:  # "ds-moe+att": the same MLP as "ds-moe"
            continue
        mlp = models[e.name].block_list()[0].mlp
        w_in, w_out = mlp.experts.w_in, mlp.experts.w_out
        per_pair = 2 * s.width * (w_in.shape[1] + w_out.shape[1])
        if mlp.router is None:

            def dense_job(mlp=mlp):
                mlp.experts.dense(x, None)

            jobs[f"{e.name}/dense"] = dense_job
            flops[f"{e.name}/dense"] = per_pair * s.mlp_tokens
            continue
        with torch.inference_mode():
            routing = route(mlp.router(x), e.plan.setting("mlp", 0))
        pairs = int(routing.mask.sum())
        for label, kernels in (("fast", Kernels()), ("reference", Kernels("reference"))):

            def job(mlp=mlp, routing=routing, kernels=kernels):
                mlp.experts.sparse(x, routing, kernels)

            jobs[f"{e.name}/sparse-{label}"] = job
            flops[f"{e.name}/sparse-{label}"] = per_pair * pairs
    with torch.inference_mode():
        times = best_of(jobs, s.repeats, s.device, f"MLP FLOP/s on {s.mlp_tokens} tokens")
    out = {
        name: {"seconds": t, "gflop": flops[name] / 1e9, "gflops_per_s": flops[name] / t / 1e9}
        for name, t in times.items()
    }
    dense_rate = out["dense/dense"]["gflops_per_s"]
    for v in out.values():
        v["share_of_dense_flops_per_s"] = v["gflops_per_s"] / dense_rate
    return out


def bandwidth(s: BenchSettings) -> dict[str, float]:
    """This machine's memory bandwidth, GB/s (10^9 bytes) over a ``bandwidth_mb`` buffer (by default larger than
    the last-level cache of the machines we measure on), best of ``repeats`` rounds at the benchmark's thread count:

    * ``read``: a sum over the whole buffer, a pure streaming read: the machine's limit for reading weights (on a
      2-vCPU EPYC 29-57 GB/s between processes, where llama.cpp's decode reads ~31; issue #33);
    * ``matvec``: the bytes of a matrix-vector product's matrix, which is what a decode step does with its weights
      through torch's products (17 GB/s on the same machine);
    * ``copy``: the bytes copied (each read once and written once).

    Batch-1 decode's weight reads are reported as a share of ``read``."""
    n = s.bandwidth_mb * 2**20 // 4
    matrix = torch.rand(n // 1024, 1024, device=s.device)
    vector = torch.rand(1024, device=s.device)
    dst = torch.empty_like(matrix)

    def read() -> None:
        matrix.sum()

    def matvec() -> None:
        matrix @ vector

    def copy() -> None:
        dst.copy_(matrix)

    times = best_of(
        {"read": read, "matvec": matvec, "copy": copy},
        s.repeats,
        s.device,
        f"memory bandwidth, {s.bandwidth_mb} MB",
    )
    return {f"{name}_gb_per_s": n * 4 / t / 1e9 for name, t in times.items()}


def decode_bandwidth(row: dict, vocab_size: int, d_model: int, itemsize: int, read_gb_per_s: float) -> dict:
    """Batch-1 decode as bytes of weights read per second: each token reads its active (non-embedding)
    parameters and the whole LM head (one embedding row is left out)."""
    weight_bytes = (row["active_params"] + vocab_size * d_model) * itemsize
    rate = weight_bytes * row["output_tps_b1"] / 1e9
    return {
        "decode_b1_weight_bytes_per_token": weight_bytes,
        "decode_b1_weight_gb_per_s": rate,
        "decode_b1_bandwidth_share": rate / read_gb_per_s,
    }


@contextlib.contextmanager
def building_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Where new modules are made: on a GPU, there and in ``dtype``, since a 6B model's fp32 initialisation on the CPU
    takes minutes and twice its bf16 memory; on the CPU as before (fp32 on the CPU, cast by ``prepare``)."""
    if device == "cpu":
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def prepare_entry(s: BenchSettings, entries: list[BenchModel], index: int, **options) -> Prepared:
    """Entry ``index``'s model, prepared with ``options``: every copy built from the same seed, so that it has the
    same weights."""
    with torch.random.fork_rng(), building_on(s.device, DTYPES[s.dtype]):
        torch.manual_seed(s.seed + index)
        model = Transformer(entries[index].cfg)
    return prepare(
        model, entries[index].plan, device=s.device, dtype=DTYPES[s.dtype], kernels=s.kernels, **options
    )


def run_benchmark(s: BenchSettings) -> dict:
    s.check()
    torch.manual_seed(s.seed)
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    entries = [
        e
        for e in bench_models(
            s.width, s.n_layers, s.vocab_size, s.max_seq_len, s.mlp_k, s.att_k, s.shape, s.size
        )
        if e.name.split("+")[0] in s.models
    ]

    def prepared(index: int, **options) -> Prepared:
        return prepare_entry(s, entries, index, **options)

    ready = {e.name: prepared(i) for i, e in enumerate(entries)}
    models = {name: p.model for name, p in ready.items()}
    plans = {name: p.plan for name, p in ready.items()}
    # row name -> model; beside each model, its int8 copy (--quantize), its copy on torch's own products (--mkl) and
    # its copy with packed weights (--prepack)
    variants = dict(models)
    model_of = {name: name for name in models}  # variant -> the model it is (a copy of)
    int8_variants = set()
    for i, e in enumerate(entries):
        int8_copy = prepared(i, quantize=s.quantize) if s.quantize != "none" else None
        if int8_copy is not None and int8_copy.quantize == s.quantize:  # not where int8 would not pay
            variants[f"{e.name}+{s.quantize}"] = int8_copy.model
            model_of[f"{e.name}+{s.quantize}"] = e.name
            int8_variants.add(f"{e.name}+{s.quantize}")
        if s.mkl:
            variants[f"{e.name}+mkl"] = prepared(i, onednn=False).model
            model_of[f"{e.name}+mkl"] = e.name
        if s.prepack:
            variants[f"{e.name}+prepack"] = prepared(i, prepack=True).model
            model_of[f"{e.name}+prepack"] = e.name
    runners: dict[str, Runner] = {}
    compiled_rows = {}  # row name -> the variant it decodes compiled
    for name, m in variants.items():
        plan = plans[model_of[name]]
        if s.decode != "compiled":
            runners[name] = DSMoERunner(m, s.device, plan)
        if s.decode != "eager":
            row = name if s.decode == "compiled" else f"{name}+compiled"
            runners[row] = DSMoERunner(m, s.device, plan, compile=True)
            compiled_rows[row] = name
    peers = []
    if s.peers:
        from dsmoe.bench.peers import HFRunner, build_peers

        peers = build_peers(entries, models, s.device, DTYPES[s.dtype])
        runners.update({p.name: HFRunner(p.model, s.device) for p in peers})
    measured, x_in = measure_models(s, runners)
    figures = measured["models"]

    def rows_of(name: str) -> list[str]:
        """The rows that measure our model ``name``: eager, compiled, or both, and its copies'."""
        return [row for row in runners if model_of.get(compiled_rows.get(row, row)) == name]

    def quantized(row: str) -> bool:
        """Whether ``row`` measures a quantized copy of one of our models (a peer is neither ours nor quantized)."""
        return compiled_rows.get(row, row) in int8_variants

    for e in entries:
        counts = active_params(e, models[e.name], x_in)
        for row in rows_of(e.name):
            figures[row].update(counts)
    for p in peers:
        figures[p.name].update(
            active_params=p.active_params, total_params=p.total_params, embedding_params=p.embedding_params
        )
    memory = bandwidth(s)
    if 1 in s.decode_batches:
        itemsize = DTYPES[s.dtype].itemsize
        for name, row in figures.items():
            size = 1 if quantized(name) else itemsize  # int8: one byte per weight (routers, norms aside)
            row.update(decode_bandwidth(row, s.vocab_size, s.width, size, memory["read_gb_per_s"]))
    keys = (*_metric_keys(s), "active_params", "total_params")
    baseline = figures["dense"]
    result = {
        "settings": asdict(s),
        "machine": machine(s.device),
        "memory_bandwidth": memory,
        "input_batch": measured["input_batch"],
        "models": figures,
        "ratios": {name: {k: r[k] / baseline[k] for k in keys} for name, r in figures.items()},
    }
    if s.peers:
        result["peer_ratios"] = {
            row: {"peer": p.name, **{k: figures[row][k] / figures[p.name][k] for k in keys}}
            for p in peers
            for row in rows_of(p.of)
        }
        result["peers"] = {p.name: p.describe() for p in peers}
    result.update(
        mlp_flops=mlp_flops(s, entries, models),
        shapes={e.name: e.cfg.to_dict() for e in entries},
        sparse_settings={
            e.name: {
                "att": e.att.describe() if e.att else "trained",
                "mlp": e.mlp.describe() if e.mlp else "trained",
            }
            for e in entries
        },
    )
    return result


def _metric_keys(s: BenchSettings) -> list[str]:
    return ["input_tps", *(f"output_tps_b{b}" for b in s.decode_batches), "latency_s"]


# The CPU features that decide which kernels are fast (AVX2-only AMD EPYC and AVX-512/AMX Xeon machines differ here).
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_name() -> str:
    """The CPU's model name as lscpu gives it, with the vector features of CPU_FEATURES it has, e.g.
    'AMD EPYC (avx2, avx512f, avx512_vnni, avx512_bf16)'."""
    model, flags = "", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux
        pass
    model = model or platform.processor() or platform.machine()
    features = [f for f in CPU_FEATURES if f in flags]
    return f"{model} ({', '.join(features)})" if features else model


def machine(device: str) -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
