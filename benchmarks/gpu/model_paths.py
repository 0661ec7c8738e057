"""DS-MoE on a CUDA GPU with each sparse path (Triton kernels, sorted dispatch with torch's grouped_mm, the fused
Triton expert MLP), beside Dense, in one process: prefill tokens/s and eager decode tokens/s at batch 1 and 16.

    PYTHONPATH=. python benchmarks/gpu/model_paths.py [--out model_paths.json]

Models: `dsmoe bench --shape llama --d-model 1024 --n-layers 4`'s Dense and DS-MoE (top-4 of 32 MLP experts,
attention dense), bf16, random weights. Each figure is the best of 3 rounds, the paths taking turns.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dsmoe.bench.models import bench_models
from dsmoe.inference.generate import Decoder
from dsmoe.model.plan import SparsePlan
from dsmoe.model.transformer import Transformer


def seconds(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_tps(model: Transformer, plan: SparsePlan, batch: int, new: int = 32) -> float:
    decoder = Decoder(model, batch, 8 + new, plan=plan)
    logits = decoder.prefill(torch.randint(0, 4096, (batch, 8), device="cuda"))

    def run():
        nonlocal logits
        for _ in range(new):
            logits = decoder.step(logits.argmax(-1))

    return batch * new / seconds(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("model_paths.json"))
    args = parser.parse_args()
    entries = {e.name: e for e in bench_models(1024, 4, 4096, 512, shape="llama")}
    models = {}
    for name in ("dense", "ds-moe"):
        torch.manual_seed(0)
        models[name] = Transformer(entries[name].cfg).to("cuda", torch.bfloat16).eval()
    runs = {
        "dense": ("dense", None),
        "ds-moe/triton": ("ds-moe", "triton"),
        "ds-moe/sorted": ("ds-moe", "sorted"),
        "ds-moe/fused": ("ds-moe", "fused"),
    }
    x = torch.randint(0, 4096, (64, 256), device="cuda")
    best: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for _ in range(3):
            for run, (name, path) in runs.items():
                plan = entries[name].plan.with_kernels(path)  # None: the device's default path
                figures = {
                    "input_tps": x.numel() / seconds(lambda m=models[name], p=plan: m(x, plan=p)),
                    "decode_tps_b1": decode_tps(models[name], plan, 1),
                    "decode_tps_b16": decode_tps(models[name], plan, 16),
                }
                kept = best.setdefault(run, figures)
                for k, v in figures.items():
                    kept[k] = max(kept[k], v)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "best_of_3": best}
    result["vs_dense"] = {
        r: {k: round(v / best["dense"][k], 3) for k, v in f.items()} for r, f in best.items()
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["vs_dense"]))
    print(json.dumps(best))


if __name__ == "__main__":
    main()
