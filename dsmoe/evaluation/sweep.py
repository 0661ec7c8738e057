"""Sparsity sweeps as in the paper: perplexity against measured active parameters over a grid of sparse settings
(Figures 3-4), per-layer share of active experts at one threshold (Figure 5), and a Table-3-style markdown table.

Grid points mean what ``dsmoe eval``'s flags mean: a strategy and its epsilon or K set the MLP routers, and the
attention routers run as trained; ``att_same=True`` (``--att-same``) gives the threshold strategies' points the same
setting for attention too (the paper's Figures 3-4 threshold both); ``topk`` never touches attention, as the paper's
TopK. The dense point (every expert of both) is always measured first as the reference. A per-layer settings file
(``dsmoe tune``) adds one point, strategy ``settings``, to compare against the curves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dsmoe.config import ConfigError
from dsmoe.evaluation.text import evaluate_text
from dsmoe.files import write_atomic
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting, describe_setting

if TYPE_CHECKING:
    from dsmoe.model.transformer import Transformer

LayerList = list[SparseSetting | None]

SWEEP_STRATEGIES = ("threshold", "topk", "threshold_topk")


@dataclass(frozen=True)
class GridPoint:
    strategy: str  # "dense" for the reference point, "settings" for a per-layer settings file
    att: SparseSetting | LayerList | None  # None: as trained
    mlp: SparseSetting | LayerList | None
    value: float | None  # the swept epsilon or K
    name: str | None = None  # the settings file's label

    @property
    def label(self) -> str:
        if self.strategy == "settings":
            return f"per-layer settings {self.name}"
        if self.strategy == "dense":
            return "dense"
        return f"att {describe_setting(self.att)}, mlp {describe_setting(self.mlp)}"


def settings_point(plan: SparsePlan, name: str) -> GridPoint:
    """The sweep point of a per-layer settings file (``dsmoe sweep --settings FILE``)."""
    return GridPoint("settings", list(plan.att), list(plan.mlp), None, name)


def sweep_grid(
    strategies: Sequence[str],
    thresholds: Sequence[float],
    ks: Sequence[int],
    n_mlp_experts: int,
    att_same: bool = False,
) -> list[GridPoint]:
    dense = SparseSetting()
    points = [GridPoint("dense", dense, dense, None)]
    for strategy in strategies:
        if strategy not in SWEEP_STRATEGIES:
            raise ConfigError(
                f"unknown sweep strategy '{strategy}': choose from {', '.join(SWEEP_STRATEGIES)}"
            )
        if strategy == "topk":
            bad = [k for k in ks if not 1 <= k <= n_mlp_experts]
            if bad:
                raise ConfigError(f"--ks {bad} outside 1..{n_mlp_experts} (the model's MLP experts)")
            points += [
                GridPoint("topk", None, SparseSetting("topk", k=k), k) for k in sorted(ks, reverse=True)
            ]
        else:
            for eps in sorted(thresholds):
                setting = SparseSetting(strategy, threshold=eps)
                points.append(GridPoint(strategy, setting if att_same else None, setting, eps))
    return points


def run_sweep(
    model: Transformer,
    tokenizer,
    documents: list[str],
    points: Sequence[GridPoint],
    *,
    layer_threshold: float,
    batch_size: int = 16,
    max_len: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate every grid point, then the per-layer utilization at ``layer_threshold`` (threshold on both
    attention and MLP, as the paper's Figure 5)."""
    from tqdm import tqdm

    rows = []
    for point in tqdm(points, desc="sweep", unit="setting", disable=not progress):
        plan = SparsePlan.build(model.cfg, point.att, point.mlp)
        result = evaluate_text(
            model, tokenizer, documents, plan, batch_size=batch_size, max_len=max_len, progress=progress
        )
        result.pop("layers")
        rows.append({"strategy": point.strategy, "value": point.value, "label": point.label, **result})
    setting = SparseSetting("threshold", threshold=layer_threshold)
    plan = SparsePlan.build(model.cfg, setting, setting)
    utilization = evaluate_text(
        model, tokenizer, documents, plan, batch_size=batch_size, max_len=max_len, progress=progress
    )
    return {
        "points": rows,
        "layer_utilization": {
            "threshold": layer_threshold,
            "layers": utilization["layers"],
            "token_perplexity": utilization["token_perplexity"],
            "word_perplexity": utilization["word_perplexity"],
            "active_params": utilization["active_params"],
        },
    }


def markdown_table(model_name: str, rows: Sequence[dict]) -> str:
    """Rows laid out like the paper's Table 3: model, quality (bits per byte and token perplexity first), active
    parameters, active share and active hidden (defined in dsmoe.inference.meter)."""
    lines = [
        "| Model | Setting | Bits/byte | Token PPL | Word PPL | Active params | Active share | Active hidden |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {model_name} | {r['label']} | {r['bits_per_byte']:.4f} | {r['token_perplexity']:.2f} | "
            f"{r['word_perplexity']:.2f} | {format_params(r['active_params'])} | {r['active_share']:.1%} | "
            f"{r['active_hidden']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def format_params(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def plot_tradeoff(rows: Sequence[dict], path: Path, title: str) -> None:
    """Token perplexity against active parameters, one line per strategy with each point's eps or K beside it, the
    dense point as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy in SWEEP_STRATEGIES:
        pts = sorted(
            (r["active_params"], r["token_perplexity"], r["value"]) for r in rows if r["strategy"] == strategy
        )
        if pts:
            (line,) = ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="o", label=strategy)
            name = "k" if strategy == "topk" else "eps"
            for x, y, value in pts:
                ax.annotate(
                    f"{name}={value:g}", (x / 1e6, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    color=line.get_color(),
                )  # fmt: skip
    marks = {  # single points beside the curves: strategy -> (marker, size, colour, label or None for the row's)
        "settings": ("D", 9, "crimson", None),
        "dense": ("*", 14, "black", "dense (all experts)"),
    }
    for r in rows:
        if r["strategy"] in marks:
            marker, size, color, label = marks[r["strategy"]]
            ax.plot(
                r["active_params"] / 1e6,
                r["token_perplexity"],
                marker=marker,
                markersize=size,
                color=color,
                linestyle="none",
                label=label or r["label"],
            )
    ax.set_xlabel("active non-embedding parameters (M)")
    ax.set_ylabel("token perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_layers(layers: dict, threshold: float, path: Path, title: str) -> None:
    """Mean share of active experts per layer with min-max error bars, attention and MLP side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.38
    for offset, kind, name in ((-width / 2, "att", "self-attention"), (width / 2, "mlp", "MLP")):
        stats = layers[kind]
        xs = [i + offset for i in range(len(stats))]
        means = [100 * s["mean"] for s in stats]
        low = [100 * (s["mean"] - s["min"]) for s in stats]
        high = [100 * (s["max"] - s["mean"]) for s in stats]
        ax.bar(xs, means, width, yerr=[low, high], capsize=3, label=name)
    ax.set_xticks(range(len(layers["mlp"])))
    ax.set_xlabel("layer")
    ax.set_ylabel("active experts (%)")
    ax.set_ylim(0, 125)  # room above the bars for the legend
    ax.set_title(f"{title} (threshold eps={threshold})")
    ax.legend(loc="upper center", ncol=2)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_sweep(result: dict, out_dir: Path, model_name: str, settings: dict) -> dict[str, Path]:
    """sweep.json, table.md and the two PNG plots in ``out_dir``; each file is written whole or not at all."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "sweep.json",
        "table": out_dir / "table.md",
        "tradeoff": out_dir / "perplexity_vs_active.png",
        "layers": out_dir / "layer_utilization.png",
    }
    write_atomic(paths["json"], json.dumps({"model": model_name, **settings, **result}, indent=2) + "\n")
    write_atomic(paths["table"], markdown_table(model_name, result["points"]))
    plot_tradeoff(result["points"], paths["tradeoff"], f"{model_name}: sparsity vs perplexity")
    util = result["layer_utilization"]
    plot_layers(util["layers"], util["threshold"], paths["layers"], f"{model_name}: layer utilization")
    return paths
