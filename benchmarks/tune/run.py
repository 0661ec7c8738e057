"""`dsmoe tune` at several budgets on one checkpoint: per-layer settings against the best single global threshold,
both chosen on the same dev text, reported on a test text (documents alternate into the two).

    python benchmarks/tune/run.py --checkpoint RUN/checkpoints/step-N --source wikipedia --max-docs 80 \\
        --dev-tokens 20000 --test-tokens 40000 --budgets 0.01,0.02,0.05 --out benchmarks/tune/NAME

Writes NAME.json (every budget's record, as `dsmoe tune --json` prints it), NAME.md (the table) and
NAME-settings-B.json (the settings file of budget B). The budgets share their measurements (the sensitivity sweep
is the same for every budget), so the cost of the first budget is that of one `dsmoe tune`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from dsmoe.evaluation.repro import split_dev_test
from dsmoe.evaluation.sweep import format_params
from dsmoe.evaluation.text import load_eval_text
from dsmoe.evaluation.tune import TuneOptions
from dsmoe.evaluation.tune_run import first_tokens, tune_and_report
from dsmoe.files import write_atomic
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings_file import plan_to_dict
from dsmoe.training.checkpoint import load_pretrained


def table(name: str, records: list[dict]) -> str:
    metric = records[0]["metric"]
    lines = [
        f"| Model | Budget | Setting | Test {metric.replace('_', ' ')} | Test bits/byte | Active params | "
        "Active share | Fewer active params than global |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    trained = records[0]["test"]["trained"]
    lines.append(
        f"| {name} | - | as trained | {trained[metric]:.2f} | {trained['bits_per_byte']:.4f} | "
        f"{format_params(trained['active_params'])} | 100% | |"
    )
    for r in records:
        t = r["test"]
        g = t.get("global")
        if g is not None:
            lines.append(
                f"| {name} | {r['budget']:.0%} | global {r['dev']['global_setting']} | {g[metric]:.2f} | "
                f"{g['bits_per_byte']:.4f} | {format_params(g['active_params'])} | {g['active_share']:.1%} | |"
            )
        u = t["tuned"]
        fewer = "" if g is None else f"{1 - u['active_params'] / g['active_params']:.1%}"
        label = "per-layer (tune)" if r["chosen"] == "per-layer" else "per-layer (= global)"
        lines.append(
            f"| {name} | {r['budget']:.0%} | {label} | {u[metric]:.2f} | {u['bits_per_byte']:.4f} | "
            f"{format_params(u['active_params'])} | {u['active_share']:.1%} | {fewer} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text")
    text.add_argument("--source")
    p.add_argument("--max-docs", type=int)
    p.add_argument("--dev-tokens", type=int)
    p.add_argument("--test-tokens", type=int)
    p.add_argument("--budgets", default="0.01,0.02,0.05")
    p.add_argument("--strategy", default="threshold")
    p.add_argument("--metric", default="word", help="perplexity the budget is on: word, token or byte")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--name", help="model name in the table (default: the output's name)")
    p.add_argument("--out", required=True, type=Path, help="output prefix, e.g. benchmarks/tune/ds-moe")
    args = p.parse_args()

    text_ = load_eval_text(args.text, None, args.source, max_docs=args.max_docs)
    model, tokenizer = load_pretrained(args.checkpoint)
    dev_all, test_all = split_dev_test(text_.documents)
    dev, test = (
        first_tokens(tokenizer, dev_all, args.dev_tokens),
        first_tokens(tokenizer, test_all, args.test_tokens),
    )
    memo: dict = {}
    test_memo: dict = {}
    records = []
    started = time.perf_counter()
    for budget in (float(b) for b in args.budgets.split(",")):
        opts = TuneOptions(
            budget=budget, strategy=args.strategy, metric=args.metric, batch_size=args.batch_size
        )
        chosen, record = tune_and_report(model, tokenizer, dev, test, opts, memo=memo, test_memo=test_memo)
        record = {"checkpoint": str(args.checkpoint), "data": text_.description, **record}
        records.append(record)
        settings = args.out.with_name(f"{args.out.name}-settings-{budget:g}.json")
        plan = SparsePlan.build(model.cfg, chosen.att, chosen.mlp)
        write_atomic(settings, json.dumps(plan_to_dict(plan, record), indent=2) + "\n")
        print(
            f"budget {budget:g}: {record['search']['evaluations']} new dev evaluations, "
            f"{record['search']['seconds']:.0f} s",
            flush=True,
        )
    name = args.name or args.out.name
    result = {
        "command": "python benchmarks/tune/run.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
        "dev_evaluations": len(memo),
        "records": records,
    }
    write_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_atomic(args.out.with_suffix(".md"), table(name, records))
    print(table(name, records), end="")


if __name__ == "__main__":
    main()
