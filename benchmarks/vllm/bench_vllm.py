"""The paper's throughput setting (Table 5) in vLLM: input and output tokens/s of our Dense, SMoE and DS-MoE exports
of the bench shapes (``dsmoe bench --shape llama``: SwiGLU, RMSNorm; the toy's 16 query heads and 4 K/V heads, or a
paper size's own with ``--size``) and of vLLM's own ``LlamaForCausalLM`` at our Dense model's shape, each served by
vLLM in a process of its own, one after another.

    .venv-vllm/bin/python benchmarks/vllm/bench_vllm.py --out benchmarks/vllm/throughput-cpu-fp32.json
    .venv-vllm/bin/python benchmarks/vllm/bench_vllm.py --size 1b --out benchmarks/vllm/throughput-cpu-fp32-1b.json

Input tokens/s: prompts of --input-len tokens, one new token each. Output tokens/s: --batch sequences of
--decode-prompt tokens decoding --decode-tokens tokens each (batch 1 and the batch). Random prompts, prefix caching
off, so nothing is served from cache; every figure is the median of --repeats after a warm-up. Weights are random
(seeded): speed does not depend on what they say, except for threshold routing, whose active share is measured
natively by dsmoe's meter on the same kind of input and reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("vllm-llama", "dense", "smoe", "ds-moe", "ds-moe-threshold")


def build_folders(args, root: Path) -> dict[str, dict]:
    """Exported folders (and vLLM's Llama) of every model, with what each one is."""
    import torch

    from dsmoe.bench.models import bench_models
    from dsmoe.bench.peers import peer_config
    from dsmoe.hf.export import export
    from dsmoe.model.settings import SparseSetting
    from dsmoe.model.transformer import Transformer
    from dsmoe.training.checkpoint import write_checkpoint

    entries = {
        e.name: e
        for e in bench_models(
            args.d_model,
            args.n_layers,
            args.vocab_size,
            args.max_len,
            mlp_k=args.mlp_k,
            shape="llama",
            size=args.size,
        )
    }
    tokenizer = _tokenizer(root, args.vocab_size)
    threshold = SparseSetting("threshold", threshold=args.threshold)
    plan = {
        "dense": ("dense", None),
        "smoe": ("smoe", None),
        "ds-moe": ("ds-moe", entries["ds-moe"].mlp),
        "ds-moe-threshold": ("ds-moe", threshold),
    }
    folders: dict[str, dict] = {}
    checkpoints: dict[str, Path] = {}
    for name, (base, mlp) in plan.items():
        if base not in checkpoints:
            torch.manual_seed(args.seed)
            cfg = entries[base].cfg
            checkpoints[base] = write_checkpoint(
                root / f"ckpt-{base}", Transformer(cfg).state_dict(), cfg, tokenizer_file=tokenizer
            )
        folder = export(checkpoints[base], root / name, mlp=mlp, overwrite=True)
        folders[name] = {"folder": str(folder), "setting": mlp.describe() if mlp else "as trained"}
        folders[name].update(_native_share(checkpoints[base], mlp, args))

    import transformers

    _, config, _ = peer_config(entries["dense"])
    torch.manual_seed(args.seed)
    llama = transformers.LlamaForCausalLM(config)
    llama.save_pretrained(root / "vllm-llama")
    folders["vllm-llama"] = {"folder": str(root / "vllm-llama"), "setting": "dense (vLLM's own Llama)"}
    return {name: folders[name] for name in MODELS if name in args.models}


def _tokenizer(root: Path, vocab: int) -> Path:
    from dsmoe.data.tokenizer import save_tokenizer, train_bpe

    words = [f"w{i}" for i in range(2000)]
    return save_tokenizer(
        train_bpe([" ".join(words[i:] + words[:i]) for i in range(50)], vocab), root / "tok"
    )


def _native_share(checkpoint: Path, mlp, args) -> dict:
    """Active parameters dsmoe's own meter measures for this setting over random tokens (prefill of one input)."""
    import torch

    from dsmoe.inference.meter import ActiveMeter
    from dsmoe.model.plan import SparsePlan
    from dsmoe.training.checkpoint import load_pretrained

    model, _ = load_pretrained(checkpoint)
    meter = ActiveMeter(model.cfg)
    tokens = torch.randint(
        0, args.vocab_size, (2, args.input_len), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        meter.update(model(tokens, plan=SparsePlan.build(model.cfg, mlp=mlp)).routers)
    summary = meter.summary()
    mlp_share = statistics.mean(layer["mean"] for layer in summary["layers"]["mlp"])
    return {
        "active_params": summary["active_params"],
        "non_embedding_params": summary["non_embedding_params"],
        "active_mlp_experts_share": round(mlp_share, 4),
    }


def measure(folder: str, args) -> dict:
    """Runs in its own process: one vLLM engine over ``folder``."""
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(args.seed)
    llm = LLM(
        model=folder,
        dtype="float32",
        trust_remote_code=True,
        skip_tokenizer_init=True,
        max_model_len=args.max_len,
        max_num_seqs=max(args.batch, args.input_batch),
        max_num_batched_tokens=args.input_len * args.input_batch,
        enable_prefix_caching=False,
        # a fixed KV cache: vLLM's CPU worker otherwise sizes it as a fraction of memory minus the process's RSS,
        # which failed for DS-MoE at the 1B shape (RSS 0.26 GiB past 10% of 24 GiB) while Dense fitted
        kv_cache_memory_bytes=512 * 2**20,
        seed=args.seed,
    )

    def prompts(n: int, length: int) -> list:
        return [
            TokensPrompt(prompt_token_ids=rng.integers(1, args.vocab_size, length).tolist()) for _ in range(n)
        ]

    def timed(n: int, length: int, new: int) -> tuple[float, int, int]:
        batch = prompts(n, length)
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return seconds, n * length, sum(len(o.outputs[0].token_ids) for o in outputs)

    def median_rate(n: int, length: int, new: int, count: str) -> float:
        timed(n, length, new)  # warm-up
        rates = []
        for _ in range(args.repeats):
            seconds, prompt_tokens, new_tokens = timed(n, length, new)
            rates.append((prompt_tokens if count == "input" else new_tokens) / seconds)
        return statistics.median(rates)

    return {
        "input_tps": median_rate(args.input_batch, args.input_len, 1, "input"),
        "output_tps_b1": median_rate(1, args.decode_prompt, args.decode_tokens, "output"),
        f"output_tps_b{args.batch}": median_rate(
            args.batch, args.decode_prompt, args.decode_tokens, "output"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--size",
        default="toy",
        help="the paper's size per layer (dsmoe bench --size: 1b, 3b, 6b, ...) in the SwiGLU layout; toy: --d-model",
    )
    parser.add_argument("--d-model", type=int, default=1024, help="--size toy: the width")
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--mlp-k", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=1.0, help="eps of the ds-moe-threshold model")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--input-batch", type=int, default=8)
    parser.add_argument("--decode-prompt", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every model this many times, taking turns"
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the child process's folder
    parser.add_argument("--table", type=Path, help="only write the markdown table of an existing result JSON")
    args = parser.parse_args()
    if args.table:
        args.table.with_suffix(".md").write_text(markdown(json.loads(args.table.read_text())))
        return
    if args.size == "toy" and args.d_model // 16 < 32:
        parser.error("vLLM's CPU attention needs heads of at least 32: use --d-model 512 or more (16 heads)")
    args.max_len = max(args.input_len, args.decode_prompt + args.decode_tokens) + 1
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure, args)), flush=True)
        return

    import vllm

    with tempfile.TemporaryDirectory() as tmp:
        models = build_folders(args, Path(tmp))
        rounds: dict[str, list[dict]] = {name: [] for name in models}
        for name, info in [item for _ in range(args.rounds) for item in models.items()]:
            child = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--measure", info["folder"]],
                capture_output=True,
                text=True,
                env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
            )
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode or not lines:
                log = args.out.with_suffix(f".{name}.log")
                log.write_text(child.stdout + child.stderr)
                sys.exit(f"{name}: the vLLM run failed; its whole output is in {log}")
            rounds[name].append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(name, json.dumps(rounds[name][-1]), flush=True)
        for name, info in models.items():
            info.pop("folder")
            for metric in rounds[name][0]:
                info[metric] = statistics.median(r[metric] for r in rounds[name])
            if args.rounds > 1:
                info["rounds"] = rounds[name]
    result = {
        "command": "python benchmarks/vllm/bench_vllm.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "vllm": vllm.__version__,
        "machine": {"cpus": os.cpu_count(), "device": "cpu", "dtype": "fp32"},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "measure")},
        "models": models,
    }
    tmp_out = args.out.with_suffix(".tmp")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    table = args.out.with_suffix(".md")
    table.write_text(markdown(result))
    print(f"wrote {args.out} and {table}")


def markdown(result: dict) -> str:
    """The result as a table of tokens/s, each with its ratio to our Dense (and our Dense's to vLLM's Llama)."""
    models = result["models"]
    metrics = [m for m in next(iter(models.values())) if "_tps" in m]
    metrics = ["input_tps"] + sorted(m for m in metrics if m != "input_tps")
    header = ["model", "setting", "active / total params", *metrics]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    base = models.get("dense")
    for name, info in models.items():
        share = (
            f"{info['active_params'] / 1e6:.1f}M / {info['non_embedding_params'] / 1e6:.1f}M"
            if "active_params" in info
            else "all"
        )
        cells = []
        for m in metrics:
            ratio = ""
            if base and name != "dense":
                ratio = f" ({info[m] / base[m]:.2f}x)"
            elif base and name == "dense" and "vllm-llama" in models:
                ratio = f" ({info[m] / models['vllm-llama'][m]:.2f}x of Llama)"
            cells.append(f"{info[m]:.1f}{ratio}")
        rows.append(f"| {name} | {info['setting']} | {share} | " + " | ".join(cells) + " |")
    return (
        f"`{result['command']}` ({result['date']}, vLLM {result['vllm']}, {result['machine']['cpus']} CPU cores, fp32)"
        + "\n\nTokens/s; in brackets the ratio to our Dense (for our Dense: to vLLM's Llama).\n\n"
        + "\n".join(rows)
        + "\n"
    )


if __name__ == "__main__":
    main()
