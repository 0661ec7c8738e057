"""`dsmoe tune` end to end: split the held-out text into dev (choosing) and test (reporting), search on dev
(``tune.py``), measure the trained model, the tuned settings and the best global setting on test, and write the
settings file with the whole record in its ``meta``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from dsmoe.config import ConfigError
from dsmoe.evaluation.repro import split_dev_test
from dsmoe.evaluation.sweep import format_params
from dsmoe.evaluation.text import evaluate_text
from dsmoe.evaluation.tune import (
    Measured,
    TuneOptions,
    decode_seconds_per_token,
    describe_global,
    latency_prompt,
    summary,
    tune,
)
from dsmoe.files import write_atomic
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings_file import plan_to_dict


def first_tokens(tokenizer, docs: list[str], n_tokens: int | None) -> list[str]:
    """The documents from the start, about ``n_tokens`` tokens of them (all for None): whole documents, and of the
    one that crosses the limit its leading lines (at least one), so that one long article does not blow the limit."""
    if n_tokens is None:
        return docs
    if n_tokens < 1:
        raise ConfigError(f"--dev-tokens / --test-tokens must be >= 1, got {n_tokens}")
    out, total = [], 0
    for doc in docs:
        if total >= n_tokens:
            break
        n = len(tokenizer.encode(doc).ids)
        if total + n <= n_tokens:
            out.append(doc)
            total += n
            continue
        kept: list[str] = []
        for line in doc.split("\n"):
            cost = len(tokenizer.encode(line + "\n").ids)
            if kept and total + cost > n_tokens:
                break
            kept.append(line)
            total += cost
        out.append("\n".join(kept))
        break
    return out


def run_tune(
    checkpoint: Path,
    documents: list[str],
    opts: TuneOptions,
    out: Path,
    *,
    dev_tokens: int | None = None,
    test_tokens: int | None = None,
    data: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tune ``checkpoint`` on the dev half of ``documents``, report on the test half, write the settings file
    ``out``; returns the record (also the file's ``meta``)."""
    from dsmoe.inference.prepare import prepare

    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the path of the settings file to write")
    dev_all, test_all = split_dev_test(documents)
    prepared = prepare(checkpoint)
    model, tokenizer = prepared.model, prepared.tokenizer
    dev, test = first_tokens(tokenizer, dev_all, dev_tokens), first_tokens(tokenizer, test_all, test_tokens)
    chosen, record = tune_and_report(model, tokenizer, dev, test, opts, progress=progress)
    record = {"made_by": "dsmoe tune", "checkpoint": str(checkpoint), "data": data or {}, **record}
    write_atomic(
        out,
        json.dumps(plan_to_dict(SparsePlan.build(model.cfg, chosen.att, chosen.mlp), record), indent=2)
        + "\n",
    )
    return record


def tune_and_report(
    model,
    tokenizer,
    dev: list[str],
    test: list[str],
    opts: TuneOptions,
    *,
    memo: dict | None = None,
    test_memo: dict | None = None,
    progress: bool = True,
) -> tuple[Measured, dict[str, Any]]:
    """Search on ``dev``, then measure the trained model, the chosen settings and the best global setting on
    ``test``: (chosen, record). ``memo`` / ``test_memo`` share measurements between calls on the same model and
    documents (a benchmark over several budgets)."""
    from tqdm import tqdm

    started = time.perf_counter()
    bar = tqdm(desc="tune", unit="eval", disable=not progress)

    def tick(what: str) -> None:
        bar.set_postfix_str(what[:40])
        bar.update()

    def planned(n: int) -> None:
        bar.total = n
        bar.refresh()

    chosen, best_global, search = tune(model, tokenizer, dev, opts, progress=tick, planned=planned, memo=memo)
    bar.close()
    search_seconds = time.perf_counter() - started
    test_cache = {} if test_memo is None else test_memo

    def on_test(m: Measured) -> Measured:
        key = (tuple(m.att), tuple(m.mlp))
        if key not in test_cache:
            plan = SparsePlan.build(model.cfg, m.att, m.mlp)
            test_cache[key] = evaluate_text(
                model, tokenizer, test, plan, batch_size=opts.batch_size, max_len=opts.max_len
            )
        return Measured(m.att, m.mlp, test_cache[key])

    reported = {"trained": on_test(search.reference), "tuned": on_test(chosen)}
    if best_global is not None:
        reported["global"] = on_test(best_global)
    if opts.objective == "latency":
        prompt = latency_prompt(tokenizer, test, model.cfg.max_seq_len, opts.latency_tokens)
        for m in reported.values():
            m.latency = decode_seconds_per_token(
                model, prompt, m.att, m.mlp, opts.latency_tokens, opts.latency_repeats
            )
    dense_params = float(model.cfg.non_embedding_params)
    is_global = best_global is not None and chosen is best_global
    record: dict[str, Any] = {
        "budget": opts.budget,
        "metric": f"{opts.metric}_perplexity",
        "objective": opts.objective,
        "strategy": opts.strategy,
        "kinds": list(opts.kinds),
        "chosen": "global" if is_global else "per-layer",
        "note": (
            "the per-layer search found nothing better than the best global setting, which is returned"
            if is_global
            else "per-layer settings from the search"
        ),
        "split": {
            "rule": "documents alternate into dev (choosing) and test (reporting)",
            "dev_documents": len(dev),
            "test_documents": len(test),
            "dev_tokens": search.reference.result["tokens"],
            "test_tokens": reported["trained"].result["tokens"],
        },
        "dev": {
            "limit": search.limit,
            "trained": summary(search.reference, dense_params),
            "tuned": summary(chosen, dense_params),
            "global": None if best_global is None else summary(best_global, dense_params),
            "global_setting": None
            if best_global is None
            else describe_global(best_global.att, best_global.mlp),
        },
        "test": {name: summary(m, dense_params) for name, m in reported.items()},
        "search": {
            "evaluations": search.evaluations,
            "seconds": round(search_seconds, 1),
            "path_length": len(search.path),
            "global_path_length": len(search.global_path),
            "probes": search.probes,
            "global_points": search.global_points,
            "sensitivity": search.sensitivity,
        },
    }
    return chosen, record


def report_table(record: dict) -> str:
    """Test-split rows: trained, best global, tuned (perplexity, bits per byte, active parameters)."""
    metric = record["metric"]
    latency = record["objective"] == "latency"
    head = f"| Setting | {metric.replace('_', ' ')} | bits/byte | active params | active share |"
    lines = [
        head + (" s/token |" if latency else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if latency else ""),
    ]
    names = {
        "trained": "as trained",
        "global": f"best global ({record['dev']['global_setting']})",
        "tuned": "tuned",
    }
    if record["chosen"] == "global":
        names["tuned"] = "tuned (= best global)"
    for key in ("trained", "global", "tuned"):
        row = record["test"].get(key)
        if row is None:
            continue
        cells = (
            f"| {names[key]} | {row[metric]:.3f} | {row['bits_per_byte']:.4f} | {format_params(row['active_params'])} "
            f"| {row['active_share']:.1%} |"
        )
        if latency:
            cells += f" {row['seconds_per_token'] * 1e3:.2f} ms |"
        lines.append(cells)
    return "\n".join(lines) + "\n"
