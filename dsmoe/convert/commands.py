"""`dsmoe convert`: a dense Llama-family Hugging Face model -> a DS-MoE checkpoint folder, checked for exactness,
with optionally calibrated routers."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dsmoe.config import ConfigError

if TYPE_CHECKING:
    import torch


def max_logit_difference(hf_model, model, idx_BT: torch.Tensor) -> float:
    """Largest absolute difference between the two models' logits on the same tokens."""
    import torch

    with torch.no_grad():
        return float((hf_model(idx_BT).logits.float() - model(idx_BT).logits.float()).abs().max())


def convert(
    source: str,
    out: Path,
    *,
    gguf_file: str | None = None,
    mlp_experts: int = 8,
    att_experts: int = 1,
    alpha_att: float = 1e-3,
    alpha_mlp: float = 1e-3,
    max_seq_len: int | None = None,
    seed: int = 0,
    calibrate: str | None = None,
    calibration_text: Path | None = None,
    calibration_tokens: int = 16384,
    calibration_seq_len: int = 256,
    sharpness: float = 0.1,
    ridge: float = 1e-2,
    data_dir: str | None = None,
) -> dict:
    """Convert, verify that the logits match the original, optionally calibrate the routers, write ``out``."""
    import torch

    from dsmoe.convert.calibrate import calibrate_routers, calibration_batches
    from dsmoe.convert.from_hf import convert_model, load_hf_model
    from dsmoe.training.checkpoint import write_checkpoint

    if calibrate == "wikipedia":
        raise ConfigError(
            "'wikipedia' is the held-out evaluation text: calibrate on another source (e.g. bbc-news)"
        )
    if calibrate and calibration_text:
        raise ConfigError("give at most one of --calibrate SOURCE and --calibration-text FILE")
    hf_model, tokenizer = load_hf_model(source, gguf_file)
    model = convert_model(
        hf_model,
        mlp_experts,
        att_experts,
        alpha_att=alpha_att,
        alpha_mlp=alpha_mlp,
        max_seq_len=max_seq_len,
        seed=seed,
    )
    cfg = model.cfg
    check_len = min(64, cfg.max_seq_len)
    check = torch.randint(0, cfg.vocab_size, (2, check_len), generator=torch.Generator().manual_seed(seed))
    report = {
        "source": source,
        "gguf_file": gguf_file,
        "out": str(out),
        "config": cfg.to_dict(),
        "max_logit_difference": max_logit_difference(hf_model, model, check),
    }
    if calibrate or calibration_text:
        if tokenizer is None:
            raise ConfigError(f"{source} has no tokenizer, so its routers cannot be calibrated on text")
        from dsmoe.data.corpus import read_documents

        if calibrate:
            from dsmoe.data.sources import fetch_corpus

            docs = read_documents(fetch_corpus(calibrate, data_dir), field="text")
        elif calibration_text is not None:
            docs = read_documents([calibration_text], field="text")
        else:  # ruled out by the test above (a Path is never falsy)
            raise ConfigError("give --calibrate SOURCE or --calibration-text FILE")
        batches = calibration_batches(
            tokenizer, docs, calibration_tokens, min(calibration_seq_len, cfg.max_seq_len)
        )
        fits = calibrate_routers(model, batches, ridge=ridge, sharpness=sharpness)
        report["calibration"] = {
            "text": calibrate or str(calibration_text),
            "tokens": sum(b.numel() for b in batches),
            "sharpness": sharpness,
            "ridge": ridge,
            "r2": {name: round(f["r2"], 4) for name, f in fits.items()},
        }
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_file = None
        if tokenizer is not None:
            tokenizer_file = Path(tmp) / "tokenizer.json"
            tokenizer.save(str(tokenizer_file))
        write_checkpoint(out, model.state_dict(), cfg, tokenizer_file=tokenizer_file)
    return report


def cmd_convert(args: argparse.Namespace) -> int:
    report = convert(
        args.source,
        args.out,
        gguf_file=args.gguf,
        mlp_experts=args.mlp_experts,
        att_experts=args.att_experts,
        alpha_att=args.alpha_att,
        alpha_mlp=args.alpha_mlp,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
        calibrate=args.calibrate,
        calibration_text=args.calibration_text,
        calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.calibration_seq_len,
        sharpness=args.sharpness,
        ridge=args.ridge,
        data_dir=args.data_dir,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cfg = report["config"]
    print(
        f"converted {args.source} -> {args.out}: {cfg['n_layers']} layers, {cfg['n_att_experts']} attention "
        f"experts x {cfg['n_heads_per_expert']} heads, {cfg['n_mlp_experts']} MLP experts x {cfg['d_expert']} units"
    )
    print(
        f"  max |logit difference| vs the original (before calibration): {report['max_logit_difference']:.3g}"
    )
    if "calibration" in report:
        cal = report["calibration"]
        r2 = list(cal["r2"].values())
        print(
            f"  routers calibrated on {cal['tokens']:,} tokens of {cal['text']}: R^2 of the log-importance fit "
            f"{min(r2):.3f}..{max(r2):.3f} (mean {sum(r2) / len(r2):.3f})"
        )
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "convert", help="turn a dense Llama-family Hugging Face model into an equivalent DS-MoE"
    )
    p.add_argument(
        "--from", dest="source", required=True, help="a Hugging Face hub name or a local model folder"
    )
    p.add_argument("--gguf", help="a GGUF file inside that folder (needs: pip install 'dsmoe[convert]')")
    p.add_argument("--out", required=True, type=Path, help="the checkpoint folder to write")
    p.add_argument("--mlp-experts", type=int, required=True, help="experts per FFN; must divide its width")
    p.add_argument(
        "--att-experts",
        type=int,
        default=1,
        help="attention experts per layer; must divide the query heads and align with the K/V heads",
    )
    p.add_argument(
        "--alpha-att", type=float, default=1e-3, help="MI-loss weight of attention routers in training"
    )
    p.add_argument("--alpha-mlp", type=float, default=1e-3, help="MI-loss weight of MLP routers in training")
    p.add_argument("--max-seq-len", type=int, help="default: the model's max_position_embeddings")
    p.add_argument("--seed", type=int, default=0, help="seeds the clustering of FFN units")
    g = p.add_argument_group(
        "router calibration (default: none; routers give every expert 1/N, exactly dense)"
    )
    g.add_argument("--calibrate", metavar="SOURCE", help="a dsmoe text source to calibrate on, e.g. bbc-news")
    g.add_argument("--calibration-text", type=Path, help="or a text/JSONL file or folder")
    g.add_argument("--calibration-tokens", type=int, default=16384)
    g.add_argument("--calibration-seq-len", type=int, default=256)
    g.add_argument(
        "--sharpness",
        type=float,
        default=0.1,
        help="router logits = sharpness x predicted log-importance; lower keeps dense outputs closer",
    )
    g.add_argument(
        "--ridge", type=float, default=1e-2, help="ridge penalty, relative to the inputs' mean energy"
    )
    p.add_argument(
        "--data-dir", help="cache of fetched sources (default $DSMOE_DATA_DIR or ~/.cache/dsmoe/data)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_convert)
