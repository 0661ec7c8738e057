"""Sparsity sweeps as in the paper: perplexity against measured active parameters over a grid of sparse settings
(Figures 3-4), per-layer share of active experts at one threshold (Figure 5), and a Table-3-style markdown table.

Grid points: ``threshold`` and ``threshold_topk`` apply the same strategy and epsilon to the attention and MLP
routers (``att_dense=True`` keeps attention dense instead); ``topk`` sets K for the MLP routers and keeps attention
dense, as the paper's TopK does. The dense point (every expert) is always measured first as the reference. A
per-layer settings file (``dsmoe tune``) adds one point, strategy ``settings``, to compare against the curves.
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
from dsmoe.model.settings import SparseSetting

if TYPE_CHECKING:
    from dsmoe.model.transformer import Transformer

LayerList = list[SparseSetting | None]

SWEEP_STRATEGIES = ("threshold", "topk", "threshold_topk")


@dataclass(frozen=True)
class GridPoint:
    strategy: str  # "dense" for the reference point, "settings" for a per-layer settings file
    att: SparseSetting | LayerList
    mlp: SparseSetting | LayerList
    value: float | None  # the swept epsilon or K
    name: str | None = None  # the settings file's label

    @property
    def label(self) -> str:
        if self.strategy == "settings":
            return f"per-layer settings {self.name}"
        if (
            self.strategy == "dense"
            or not isinstance(self.att, SparseSetting)
            or not isinstance(self.mlp, SparseSetting)
        ):
            return "dense"
        return f"att {self.att.describe()}, mlp {self.mlp.describe()}"


def settings_point(plan: SparsePlan, name: str) -> GridPoint:
    """The sweep point of a per-layer settings file (``dsmoe sweep --settings FILE``)."""
    return GridPoint("settings", list(plan.att), list(plan.mlp), None, name)


def sweep_grid(
    strategies: Sequence[str],
    thresholds: Sequence[float],
    ks: Sequence[int],
    n_mlp_experts: int,
    att_dense: bool = False,
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
                GridPoint("topk", dense, SparseSetting("topk", k=k), k) for k in sorted(ks, reverse=True)
            ]
        else:
            for eps in sorted(thresholds):
                setting = SparseSetting(strategy, threshold=eps)
                points.append(GridPoint(strategy, dense if att_dense else setting, setting, eps))
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
        result = evaluate_text(model, tokenizer, documents, plan, batch_size=batch_size, max_len=max_len)
        result.pop("layers")
        rows.append({"strategy": point.strategy, "value": point.value, "label": point.label, **result})
    setting = SparseSetting("threshold", threshold=layer_threshold)
    plan = SparsePlan.build(model.cfg, setting, setting)
    utilization = evaluate_text(model, tokenizer, documents, plan, batch_size=batch_size, max_len=max_len)
    return {
        "points": rows,
        "layer_utilization": {
            "threshold": layer_threshold,
            "layers": utilization["layers"],
            "word_perplexity": utilization["word_perplexity"],
            "active_params": utilization["active_params"],
        },
    }


def markdown_table(model_name: str, rows: Sequence[dict]) -> str:
    """Rows laid out like the paper's Table 3: model, perplexity, active parameters, active hidden."""
    lines = [
        "| Model | Setting | Word PPL | Token PPL | Bits/byte | Active params | Active hidden |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {model_name} | {r['label']} | {r['word_perplexity']:.2f} | {r['token_perplexity']:.2f} | "
            f"{r['bits_per_byte']:.4f} | {format_params(r['active_params'])} | {r['active_hidden']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def format_params(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def plot_tradeoff(rows: Sequence[dict], path: Path, title: str) -> None:
    """Word perplexity against active parameters, one line per strategy, the dense point as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy in SWEEP_STRATEGIES:
        pts = sorted((r["active_params"], r["word_perplexity"]) for r in rows if r["strategy"] == strategy)
        if pts:
            ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="o", label=strategy)
    marks = {  # single points beside the curves: strategy -> (marker, size, colour, label or None for the row's)
        "settings": ("D", 9, "crimson", None),
        "dense": ("*", 14, "black", "dense (all experts)"),
    }
    for r in rows:
        if r["strategy"] in marks:
            marker, size, color, label = marks[r["strategy"]]
            ax.plot(
                r["active_params"] / 1e6,
                r["word_perplexity"],
                marker=marker,
                markersize=size,
                color=color,
                linestyle="none",
                label=label or r["label"],
            )
    ax.set_xlabel("active non-embedding parameters (M)")
    ax.set_ylabel("word perplexity")
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
    ax.set_ylim(0, 105)
    ax.set_title(f"{title} (threshold eps={threshold})")
    ax.legend()
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
