"""Threshold routing against top-K at equal dev perplexity, on a trained DS-MoE: quality and speed.

Issue #31's question: does threshold routing (each token takes the experts whose router probability exceeds eps/N)
save time in a batch, against the top-K that gives the same quality? For each K of ``--ks`` (MLP experts; attention
as trained, the meaning of ``dsmoe eval --strategy``):

1. choose, on the dev half of the held-out Wikipedia articles (documents alternate dev/test), the largest eps of
   ``--thresholds`` whose dev token perplexity is at most top-K's (the sparsest threshold of equal quality);
2. report both on the test half (never used for choosing): token perplexity, bits per byte, active parameters;
3. time both, the models taking turns, best of ``--repeats``: input throughput (a batch of test sequences) and
   greedy decoding with the KV cache at each ``--batches`` (prompts cut from test documents, so routing sees real
   text), eager (and compiled with ``--compiled``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/threshold/bench_threshold.py runs/demo/model \
        --out benchmarks/threshold/results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from dsmoe.bench.throughput import best_of
from dsmoe.data.corpus import read_documents
from dsmoe.data.sources import fetch
from dsmoe.evaluation.repro import split_dev_test
from dsmoe.evaluation.text import evaluate_text
from dsmoe.files import write_atomic
from dsmoe.inference.generate import Decoder
from dsmoe.inference.meter import ActiveMeter
from dsmoe.inference.prepare import prepare
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.training.checkpoint import list_checkpoints


def checkpoint_of(path: Path) -> Path:
    """A checkpoint folder, or a run folder's newest checkpoint."""
    found = list_checkpoints(path)
    return found[-1] if found else path


def quality(model, tokenizer, docs: list[str], plan: SparsePlan) -> dict:
    r = evaluate_text(model, tokenizer, docs, plan)
    keep = ("token_perplexity", "bits_per_byte", "active_params", "active_share", "tokens")
    return {k: r[k] for k in keep if k in r}


def prompts(tokenizer, docs: list[str], batch: int, length: int) -> torch.Tensor:
    """``batch`` prompts of ``length`` tokens, each from its own test document (cycling when there are fewer)."""
    rows = []
    for doc in docs:
        ids = tokenizer.encode(doc).ids
        if len(ids) >= length:
            rows.append(ids[:length])
    if not rows:
        raise SystemExit(f"no test document has {length} tokens")
    return torch.tensor([rows[i % len(rows)] for i in range(batch)])


def decode_seconds(
    model, plan: SparsePlan, prompt: torch.Tensor, n_new: int, compile: bool, meter: ActiveMeter | None = None
) -> float:
    decoder = Decoder(
        model, prompt.shape[0], prompt.shape[1] + n_new, plan=plan, compile=compile, meter=meter
    )
    token = decoder.prefill(prompt).argmax(-1)
    start = time.perf_counter()
    for _ in range(n_new):
        token = decoder.step(token).argmax(-1)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "checkpoint", type=Path, help="a DS-MoE checkpoint, or a run folder (its newest checkpoint)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0])
    p.add_argument("--dev-docs", type=int, default=20, help="dev documents used for choosing")
    p.add_argument("--test-docs", type=int, default=20, help="test documents reported")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--input-batch", type=int, default=8, help="sequences of the input-throughput batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--compiled", action="store_true", help="also time the compiled decode step (minutes to compile)"
    )
    args = p.parse_args()

    prepared = prepare(checkpoint_of(args.checkpoint))
    model, tokenizer, cfg = prepared.model, prepared.tokenizer, prepared.cfg
    if cfg.regime != "dsmoe":
        raise SystemExit(f"{args.checkpoint} is a {cfg.regime} model: threshold routing needs a DS-MoE")
    dev_all, test_all = split_dev_test(list(read_documents([fetch("wikipedia") / "docs.jsonl"])))
    dev, test = dev_all[: args.dev_docs], test_all[: args.test_docs]

    def plan(mlp: SparseSetting | None) -> SparsePlan:
        return SparsePlan.build(cfg, mlp=mlp)

    print(f"choosing on {len(dev)} dev documents", file=sys.stderr)
    dev_ppl = {}
    for eps in args.thresholds:
        dev_ppl[f"threshold {eps:g}"] = quality(
            model, tokenizer, dev, plan(SparseSetting("threshold", threshold=eps))
        )
    settings: dict[str, SparseSetting | None] = {"dense": None}
    pairs = []
    for k in args.ks:
        top = SparseSetting("topk", k=k)
        dev_ppl[f"top-{k}"] = quality(model, tokenizer, dev, plan(top))
        target = dev_ppl[f"top-{k}"]["token_perplexity"]
        fits = [e for e in args.thresholds if dev_ppl[f"threshold {e:g}"]["token_perplexity"] <= target]
        settings[f"top-{k}"] = top
        if fits:
            eps = max(fits)
            settings[f"threshold {eps:g}"] = SparseSetting("threshold", threshold=eps)
            pairs.append((f"top-{k}", f"threshold {eps:g}"))
        else:
            pairs.append((f"top-{k}", None))
    print(f"reporting on {len(test)} test documents: {', '.join(settings)}", file=sys.stderr)
    test_q = {name: quality(model, tokenizer, test, plan(s)) for name, s in settings.items()}

    speed: dict[str, dict[str, float]] = {name: {} for name in settings}
    decoding: dict[str, dict[str, float]] = {name: {} for name in settings}
    x_in = prompts(tokenizer, test, args.input_batch, cfg.max_seq_len)

    def prefill(setting: SparseSetting | None) -> None:
        model(x_in, plan=plan(setting), last_only=True)

    with torch.inference_mode():
        jobs = {n: (lambda s=s: prefill(s)) for n, s in settings.items()}
        for name, t in best_of(jobs, args.repeats, "cpu").items():
            speed[name]["input_tps"] = x_in.numel() / t
    for compile in (False, True) if args.compiled else (False,):
        for b in args.batches:
            prompt = prompts(tokenizer, test, b, args.prompt)
            print(f"decode batch {b} {'compiled' if compile else 'eager'}", file=sys.stderr, flush=True)
            jobs = {
                n: (lambda s=s, p=prompt, c=compile: decode_seconds(model, plan(s), p, args.new_tokens, c))
                for n, s in settings.items()
            }
            key = f"output_tps_b{b}" + ("_compiled" if compile else "")
            for name, t in best_of(jobs, args.repeats, "cpu").items():
                speed[name][key] = b * args.new_tokens / t
            if compile:
                continue
            # what each setting ran while decoding (prompt included), metered in an untimed run
            for name, setting in settings.items():
                meter = ActiveMeter(cfg)
                decode_seconds(model, plan(setting), prompt, args.new_tokens, False, meter)
                mlp = meter.mean_active("mlp")
                decoding[name][f"b{b}_mlp_experts_per_token"] = sum(mlp) / len(mlp)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next(
        (line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), ""
    )
    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": model_name or platform.processor(), "threads": torch.get_num_threads()},
        "checkpoint": str(checkpoint_of(args.checkpoint)),
        "split": {"dev_documents": len(dev), "test_documents": len(test), "rule": "alternate documents"},
        "dev": dev_ppl,
        "pairs": pairs,
        "test": test_q,
        "speed": speed,
        "decoding": decoding,
    }
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


def table(result: dict) -> str:
    speed_keys = list(next(iter(result["speed"].values())))
    lines = [
        "| setting | test token ppl | bits/byte | active share | " + " | ".join(speed_keys) + " |",
        "|---" * (4 + len(speed_keys)) + "|",
    ]
    for name, q in result["test"].items():
        s = result["speed"][name]
        lines.append(
            f"| {name} | {q['token_perplexity']:.2f} | {q['bits_per_byte']:.4f} | {q['active_share']:.1%} | "
            + " | ".join(f"{s[k]:.0f}" for k in speed_keys)
            + " |"
        )
    counts = list(next(iter(result["decoding"].values())))
    lines += ["", "| MLP experts per token while decoding | " + " | ".join(counts) + " |"]
    lines.append("|---" * (1 + len(counts)) + "|")
    for name, row in result["decoding"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k in counts) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
