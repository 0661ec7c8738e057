"""Weight-only int8 against fp32 in the compiled decode step, one process, models taking turns (issue #17, item 6).

    .venv/bin/python benchmarks/int8_decode.py [--threads 2] [--rounds 5] [--out benchmarks/int8_decode.json]

Models: `dsmoe bench --shape llama`'s Dense and DS-MoE (width 1,024, 4 layers, vocabulary 4,096, untied; DS-MoE top-4
of 32 MLP experts of 88, attention dense), random weights, fp32; int8 = ``dsmoe.inference.quantize`` of the same
weights. Decode tokens/s after an 8-token prompt, best of --rounds rounds of --tokens greedy tokens, at batch 1 and
16; also the int8 model's greedy tokens agree with fp32's (share of positions until the first difference).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from dsmoe.bench.models import bench_models
from dsmoe.inference.generate import Decoder
from dsmoe.inference.quantize import quantize
from dsmoe.model.plan import SparsePlan
from dsmoe.model.transformer import Transformer


def decode_tps(model: Transformer, plan: SparsePlan, batch: int, tokens: int) -> float:
    decoder = Decoder(model, batch, 8 + tokens, plan=plan, compile=True)
    logits = decoder.prefill(torch.randint(0, model.cfg.vocab_size, (batch, 8)))
    start = time.perf_counter()
    for _ in range(tokens):
        logits = decoder.step(logits.argmax(-1))
    return batch * tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models, plans = {}, {}
    for entry in bench_models(1024, 4, 4096, 256, shape="llama"):
        if entry.name == "smoe":
            continue
        torch.manual_seed(0)
        model = Transformer(entry.cfg).eval()
        models[entry.name] = model
        models[entry.name + "+int8"] = quantize(copy.deepcopy(model))
        plans[entry.name] = plans[entry.name + "+int8"] = entry.plan
    best: dict[str, dict[int, float]] = {name: {} for name in models}
    with torch.inference_mode():
        for batch in (1, 16):
            for name, model in models.items():  # compile (and warm) each graph before timing
                decode_tps(model, plans[name], batch, 2)
            for _ in range(args.rounds):
                for name, model in models.items():
                    tps = decode_tps(model, plans[name], batch, args.tokens)
                    best[name][batch] = max(best[name].get(batch, 0.0), tps)
    rows = [
        "| model | decode b1 tokens/s | vs fp32 | decode b16 tokens/s | vs fp32 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in models:
        base = best[name.removesuffix("+int8")]
        rows.append(
            f"| {name} | {best[name][1]:.1f} | {best[name][1] / base[1]:.2f}x | {best[name][16]:.1f} | "
            f"{best[name][16] / base[16]:.2f}x |"
        )
    print("\n".join(rows))
    if args.out:
        machine = {"processor": platform.processor(), "torch": torch.__version__, "threads": args.threads}
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine,
            "args": vars(args) | {"out": str(args.out)},
        }
        args.out.write_text(json.dumps(result | {"tokens_per_s": best}, indent=1) + "\n")


if __name__ == "__main__":
    main()
