"""CPU tokens/s of converted SmolLM2-135M under sparse settings against the original dense model, in one process:
prefill (forward over batch x seq tokens) and batch-1 decode with the KV cache. Models take turns within every
round and each figure is the best round. The DS-MoE routers are calibrated on bbc-news first, so that tokens spread
over experts as they do in use. With --compiled-decode, each of our models decodes a second time through the
compiled decode step (``Decoder(compile=True)``), as a "+compiled" row; with --int8, a third time compiled with int8
weights (``dsmoe.inference.quantize``), as a "+int8 compiled" row. Reproduce (about 10 minutes on 2 CPU cores):

    DSMOE_DATA_DIR=/tmp/dsdata HF_HUB_OFFLINE=1 python benchmarks/convert/speed.py --compiled-decode \
        --out benchmarks/convert/speed.json
    DSMOE_DATA_DIR=/tmp/dsdata HF_HUB_OFFLINE=1 python benchmarks/convert/speed.py --compiled-decode --int8 \
        --models "dense (converted 1x1)" "ds-moe 16x3 mlp top-8" --out benchmarks/convert/speed-int8.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from measure import (  # this folder: the script's own directory is on sys.path
    calibrate_on_bbc_news,
    load_smollm2,
)

from dsmoe.convert.from_hf import convert_model
from dsmoe.inference.generate import Decoder
from dsmoe.inference.quantize import quantize
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting

SETTINGS = {  # name: (experts: (MLP, attention), attention setting, MLP setting)
    "original (HF transformers)": None,
    "dense (converted 1x1)": ((1, 1), None, None),
    "ds-moe 16x3 mlp top-8": ((16, 3), None, SparseSetting("topk", k=8)),
    "ds-moe 16x3 mlp top-6": ((16, 3), None, SparseSetting("topk", k=6)),
    "ds-moe 16x3 att top-2 mlp top-8": ((16, 3), SparseSetting("topk", k=2), SparseSetting("topk", k=8)),
    "ds-moe 16x3 att top-2 mlp top-6": ((16, 3), SparseSetting("topk", k=2), SparseSetting("topk", k=6)),
}


def prefill_job(model, idx, hf: bool, plan=None):
    def job():
        with torch.inference_mode():
            model(idx, plan=plan) if not hf else model(idx, use_cache=False)

    return job


def decode_job(model, prompt, n_new: int, hf: bool, compile: bool = False, plan=None):
    def job():
        with torch.inference_mode():
            if hf:
                out = model(prompt, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
                start = time.perf_counter()
                for _ in range(n_new):
                    out = model(token[:, None], past_key_values=cache, use_cache=True)
                    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
                return time.perf_counter() - start
            decoder = Decoder(model, 1, prompt.shape[1] + n_new, plan=plan, compile=compile)
            token = decoder.prefill(prompt).argmax(-1)
            start = time.perf_counter()
            for _ in range(n_new):
                token = decoder.step(token).argmax(-1)
            return time.perf_counter() - start

    return job


def best_of(jobs: dict, repeats: int) -> dict:
    best = {name: float("inf") for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            start = time.perf_counter()
            inner = job()
            best[name] = min(best[name], inner if inner is not None else time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compiled-decode", action="store_true", help="also decode ours compiled (+compiled rows)"
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also decode ours compiled with int8 weights (+int8 compiled rows)",
    )
    parser.add_argument("--models", nargs="+", choices=list(SETTINGS), help="only these rows (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf, tokenizer = load_smollm2()
    hf.eval()
    converted = {}
    models = {}
    plans = {}  # our rows' sparse plans
    for name, spec in SETTINGS.items():
        if args.models and name not in args.models and spec is not None:  # the original is always the base
            continue
        if spec is None:
            models[name] = hf
            continue
        experts, att, mlp = spec
        if experts not in converted:
            converted[experts] = convert_model(hf, *experts, max_seq_len=args.seq + args.decode_tokens + 16)
            if experts != (1, 1):
                calibrate_on_bbc_news(converted[experts], tokenizer)
        models[name] = converted[experts]
        plans[name] = SparsePlan.build(converted[experts].cfg, att=att, mlp=mlp)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 49152, (args.batch, args.seq), generator=gen)
    prompt = torch.randint(0, 49152, (1, 16), generator=gen)
    is_hf = {name: SETTINGS[name] is None for name in models}
    prefill = best_of(
        {n: prefill_job(m, idx, is_hf[n], plans.get(n)) for n, m in models.items()}, args.repeats
    )
    decode_jobs = {
        n: decode_job(m, prompt, args.decode_tokens, is_hf[n], plan=plans.get(n)) for n, m in models.items()
    }
    if args.compiled_decode:
        decode_jobs |= {
            f"{n} +compiled": decode_job(m, prompt, args.decode_tokens, False, True, plans[n])
            for n, m in models.items()
            if not is_hf[n]
        }
    if args.int8:
        quantized = {id(m): quantize(copy.deepcopy(m)) for n, m in models.items() if not is_hf[n]}
        decode_jobs |= {
            f"{n} +int8 compiled": decode_job(
                quantized[id(m)], prompt, args.decode_tokens, False, True, plans[n]
            )
            for n, m in models.items()
            if not is_hf[n]
        }
    decode = best_of(decode_jobs, args.repeats)
    # the prefill is eager and full precision either way
    prefill |= {n: prefill[n.removesuffix(" +compiled").removesuffix(" +int8 compiled")] for n in decode}
    base = "original (HF transformers)"
    results = {"settings": vars(args) | {"out": str(args.out)}, "torch": torch.__version__, "models": {}}
    for name in decode:
        p_tps = args.batch * args.seq / prefill[name]
        d_tps = args.decode_tokens / decode[name]
        results["models"][name] = {
            "prefill_tps": p_tps,
            "decode_b1_tps": d_tps,
            "prefill_ratio": prefill[base] / prefill[name],
            "decode_ratio": decode[base] / decode[name],
        }
        print(
            f"{name:34s} prefill {p_tps:8.1f} tok/s ({prefill[base] / prefill[name]:.2f}x)  "
            f"decode b1 {d_tps:6.1f} tok/s ({decode[base] / decode[name]:.2f}x)",
            flush=True,
        )
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
