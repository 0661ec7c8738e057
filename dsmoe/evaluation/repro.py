"""`dsmoe repro`: the paper's Table 3, Figures 3-4 and Table 4 at CPU scale, in one resumable command.

Trains the Table-1-matched micro models of ``configs/repro/`` on one corpus and schedule, once per seed, and
evaluates each run as soon as it is trained:

* in-domain: the held-out (val) documents of the training corpus, which no model trains on and nothing selects on;
* Wikipedia: held-out articles alternated into a dev half, where a DS-MoE model's operating point is chosen, and a
  test half, which is what the tables report;
* the six zero-shot tasks, at the operating point.

Every run's result goes into ``results.json`` under ``<model>/seed-<seed>`` as soon as it exists, so a run killed
at any point, or a session that trains only some of the runs (``--only``), loses nothing; ``repro_tables`` turns
whatever runs are there into the tables (mean and spread over seeds) and the plot.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from dsmoe.config import ConfigError
from dsmoe.files import write_atomic
from dsmoe.model.settings import SparseSetting

TASK_COLUMNS = (
    ("dsmoe_hellaswag", "HS"),
    ("dsmoe_piqa", "PIQA"),
    ("dsmoe_winogrande", "WG"),
    ("dsmoe_sciq", "SciQ"),
    ("dsmoe_arc_easy", "Arc-e"),
    ("dsmoe_arc_challenge", "Arc-c"),
)
# Table 3's rule for a DS-MoE operating point: the sparsest threshold within this factor of the model's dense
# perplexity, here token perplexity on the Wikipedia dev half.
WITHIN = 1.03


def ensure_corpus(data: Path, source: str, vocab: int) -> None:
    """Prepare ``source`` (a fetched corpus, e.g. 'prose') into ``data`` with a BPE trained on it, if missing."""
    if (data / "index.json").is_file():
        return
    from dsmoe.data.corpus import read_documents
    from dsmoe.data.shards import prepare
    from dsmoe.data.sources import fetch_corpus
    from dsmoe.data.tokenizer import train_bpe

    files = fetch_corpus(source)
    prepare(files, train_bpe(read_documents(files), vocab), data, val_fraction=0.01, overwrite=True)


def mlp_active_share(layers: dict) -> float:
    """Mean over layers of the share of MLP experts in use (the paper's active MLP hidden units)."""
    shares = [layer["mean"] for layer in layers["mlp"]]
    return sum(shares) / len(shares)


def zero_shot(
    checkpoint: Path, att: SparseSetting | None, mlp: SparseSetting | None, limit: int | None, batch_size: int
) -> dict[str, float]:
    """acc_norm where lm-eval reports it (HellaSwag, PIQA, ARC), else acc; percent, per task. A setting of None
    runs those layers as trained (an SMoE its top-k)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dsmoe.evaluation.lm_eval_model import DSMoELM
    from dsmoe.evaluation.zero_shot import task_include_path

    lm = DSMoELM(
        str(checkpoint),
        **_model_args("", mlp),
        **_model_args("att_", att),
        batch_size=batch_size,
    )
    manager = TaskManager(include_path=str(task_include_path()), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[t for t, _ in TASK_COLUMNS], task_manager=manager, limit=limit, log_samples=False
    )["results"]
    scores = {}
    for task, _ in TASK_COLUMNS:
        metrics = results[task]
        scores[task] = 100 * metrics.get("acc_norm,none", metrics["acc,none"])
    return scores


def _model_args(prefix: str, setting: SparseSetting | None) -> dict[str, Any]:
    if setting is None:
        return {}
    return {
        f"{prefix}strategy": setting.strategy,
        f"{prefix}k": setting.k,
        f"{prefix}threshold": setting.threshold,
    }


def split_dev_test(docs: list[str]) -> tuple[list[str], list[str]]:
    """Alternate documents into a dev split (the operating point is chosen on it) and a test split (reported;
    never used for choosing)."""
    if len(docs) < 2:
        raise ConfigError(f"need at least 2 held-out documents for a dev and a test split, got {len(docs)}")
    return docs[0::2], docs[1::2]


def run_name(model: str, seed: int) -> str:
    return f"{model}/seed-{seed}"


def select_runs(models: list[str], seeds: list[int], only: list[str]) -> list[tuple[str, int]]:
    """(model, seed) pairs to train and evaluate: every model x seed, or those ``only`` names ('model' for all
    seeds, 'model:seed' for one)."""
    runs = [(m, s) for m in models for s in seeds]
    if not only:
        return runs
    chosen = []
    for item in only:
        model, _, seed = item.partition(":")
        if model not in models:
            raise ConfigError(f"--only {item}: no config '{model}'; the configs are {', '.join(models)}")
        if seed and not seed.isdigit():
            raise ConfigError(f"--only {item}: the seed after ':' must be a whole number")
        chosen += [(m, s) for m, s in runs if m == model and (not seed or s == int(seed))]
        if seed and int(seed) not in seeds:
            chosen.append((model, int(seed)))
    return list(dict.fromkeys(chosen))


def evaluation_key(checkpoint: Path, in_domain: list[str], args) -> str:
    """Every setting that changes a run's evaluation: results cached under another key are recomputed."""
    import hashlib

    settings = {
        "checkpoint": str(checkpoint),
        "in_domain_documents": hashlib.sha256("\x00".join(in_domain).encode()).hexdigest(),
        "held_out": args.eval_text or "wikipedia",
        "eval_docs": args.eval_docs,
        "split": "alternate dev/test",
        "thresholds": list(args.thresholds),
        "ks": list(args.ks),
        "task_limit": args.task_limit,
        "within": WITHIN,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _row(result: dict) -> dict[str, Any]:
    return {
        k: result[k]
        for k in ("token_perplexity", "bits_per_byte", "word_perplexity", "active_params", "active_hidden")
    } | {"mlp_active": mlp_active_share(result["layers"])}


def evaluate_run(
    checkpoint: Path, texts: dict[str, list[str]], thresholds: list[float], args
) -> dict[str, Any]:
    """One trained run on the three held-out texts ('in_domain', 'dev', 'test'): as trained and, for DS-MoE, over
    the sparsity sweep, with the operating point chosen on dev; zero-shot accuracy at that point."""
    from dsmoe.evaluation.text import evaluate_text
    from dsmoe.inference.prepare import prepare
    from dsmoe.model.plan import SparsePlan

    prepared = prepare(checkpoint)
    model, tokenizer = prepared.model, prepared.tokenizer

    def rows(att: SparseSetting | None, mlp: SparseSetting | None, label: dict) -> dict[str, dict]:
        plan = SparsePlan.build(model.cfg, att, mlp)
        return {
            name: label | _row(evaluate_text(model, tokenizer, docs, plan, batch_size=args.batch_size))
            for name, docs in texts.items()
        }

    trained = rows(None, None, {})
    entry: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "eval_key": evaluation_key(checkpoint, texts["in_domain"], args),
        "regime": model.cfg.regime,
        "alpha_mlp": model.cfg.alpha_mlp,
        "non_embedding_params": model.cfg.non_embedding_params,
        "documents": {name: len(docs) for name, docs in texts.items()},
        "trained": trained,
    }
    operating: tuple[SparseSetting | None, SparseSetting | None] = (None, None)  # as trained
    if model.cfg.regime == "dsmoe":
        sweep: list[dict[str, dict]] = []
        for eps in thresholds:
            setting = SparseSetting("threshold", threshold=eps)
            sweep.append(rows(setting, setting, {"threshold": eps}))
        for k in args.ks:
            sweep.append(rows(None, SparseSetting("topk", k=k), {"topk": k}))
        entry["sweep"] = sweep
        limit = WITHIN * trained["dev"]["token_perplexity"]
        within = [p for p in sweep if "threshold" in p["dev"] and p["dev"]["token_perplexity"] <= limit]
        # falling back to the least sparse threshold when none is within the limit
        best = min(within, key=lambda p: p["dev"]["active_params"]) if within else sweep[0]
        entry["operating_point"] = best
        eps = best["dev"]["threshold"]
        operating = (SparseSetting("threshold", threshold=eps), SparseSetting("threshold", threshold=eps))
    if args.task_limit != 0:
        entry["zero_shot"] = zero_shot(checkpoint, *operating, args.task_limit, args.batch_size)
    return entry


def run_repro(args) -> dict[str, Any]:
    """Train (resumably) and evaluate the selected runs; write results.json, the tables and the plot."""
    from dsmoe.data.loader import held_out_documents
    from dsmoe.evaluation.repro_tables import write_tables
    from dsmoe.evaluation.text import load_eval_text
    from dsmoe.training.checkpoint import list_checkpoints
    from dsmoe.training.config import load_train_config
    from dsmoe.training.loop import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = {path.stem: path for path in sorted(Path(args.configs).glob("*.yaml"))}
    if not configs:
        raise ConfigError(f"no *.yaml run configs in {args.configs}")
    results_path = out / "results.json"
    results: dict[str, dict] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    held_out = {"text": args.eval_text} if args.eval_text else {"source": "wikipedia"}
    dev, test = split_dev_test(load_eval_text(**held_out, max_docs=args.eval_docs).documents)
    timings: dict[str, float] = {}
    for model_name, seed in select_runs(list(configs), args.seeds, args.only):
        name = run_name(model_name, seed)
        cfg = load_train_config(
            configs[model_name], [f"out_dir={out / name}", f"seed={seed}", *args.overrides]
        )
        ensure_corpus(Path(cfg.data), args.corpus, args.vocab)
        start = time.perf_counter()
        train(cfg, resume=True)
        timings[name] = time.perf_counter() - start
        checkpoint = list_checkpoints(cfg.out_dir)[-1]
        texts = {"in_domain": held_out_documents(cfg.data), "dev": dev, "test": test}
        if results.get(name, {}).get("eval_key") != evaluation_key(checkpoint, texts["in_domain"], args):
            results[name] = {"model": model_name, "seed": seed} | evaluate_run(
                checkpoint, texts, args.thresholds, args
            )
            write_atomic(results_path, json.dumps(results, indent=1))
    write_tables(results, out)
    machine_path = out / "machine.json"
    machine = json.loads(machine_path.read_text()) if machine_path.is_file() else {}
    machine.update(machine=platform.platform(), cpus=os.cpu_count())
    machine.setdefault("train_seconds_last_call", {}).update(timings)
    write_atomic(machine_path, json.dumps(machine, indent=1))
    return results
