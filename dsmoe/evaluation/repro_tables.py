"""The repro's tables and plot from its per-run results: mean and spread over seeds for every figure, and whether
the differences between models are significant against that spread (Welch's t-test).

``results`` maps ``<model>/seed-<seed>`` to what ``repro.evaluate_run`` returned. A figure of a model trained with
one seed is printed without a spread; a comparison with it assumes its spread is the other model's (relative to
the mean) and says so.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

from dsmoe.evaluation.repro import TASK_COLUMNS
from dsmoe.files import write_atomic


def by_model(results: dict[str, dict]) -> dict[str, list[dict]]:
    """Runs grouped by model, in the order the models first appear, each model's runs by seed."""
    groups: dict[str, list[dict]] = {}
    for entry in results.values():
        groups.setdefault(entry["model"], []).append(entry)
    return {name: sorted(runs, key=lambda r: r["seed"]) for name, runs in groups.items()}


class Stat:
    """Mean and sample standard deviation of one figure over seeds."""

    def __init__(self, values: list[float]):
        self.values = values
        self.n = len(values)
        self.mean = statistics.fmean(values)
        self.sd = statistics.stdev(values) if self.n > 1 else None

    def format(self, fmt: str = ".2f", scale: float = 1.0, suffix: str = "") -> str:
        text = f"{self.mean * scale:{fmt}}{suffix}"
        return text if self.sd is None else f"{text} ± {self.sd * scale:{fmt}}"


def stat(runs: list[dict], pick) -> Stat:
    return Stat([pick(r) for r in runs])


def figure(runs: list[dict], pick, text: str, key: str) -> Stat:
    """One figure (``key``) on one held-out text of each run's row ``pick`` (as trained, operating point)."""
    return Stat([pick(r)[text][key] for r in runs])


def _as_trained(run: dict) -> dict:
    return run["trained"]


def _at_operating_point(run: dict) -> dict:
    return run["operating_point"]


def setting_rows(runs: list[dict]) -> dict[str, Any]:
    """A model's rows: as trained, and (DS-MoE) at the operating point each seed chose on dev."""
    rows: dict[str, Any] = {"as trained": _as_trained}
    if runs[0]["regime"] == "dsmoe":
        rows["operating point"] = _at_operating_point
    return rows


def _operating_label(runs: list[dict]) -> str:
    eps = sorted({r["operating_point"]["dev"]["threshold"] for r in runs})
    return "threshold " + "/".join(f"{e:g}" for e in eps) + " (chosen on dev)"


def table3(results: dict[str, dict]) -> str:
    """Table 3: every model as trained and (DS-MoE) at its operating point; perplexity first, then compute."""
    lines = [
        "| Model | Seeds | Setting | In-domain token PPL | In-domain bits/byte | Wikipedia token PPL | "
        "Wikipedia bits/byte | Active params | Active MLP | Zero-shot avg |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in by_model(results).items():
        for label, pick in setting_rows(runs).items():
            setting = _operating_label(runs) if label == "operating point" else label
            cells = [
                figure(runs, pick, "in_domain", "token_perplexity").format(),
                figure(runs, pick, "in_domain", "bits_per_byte").format(".4f"),
                figure(runs, pick, "test", "token_perplexity").format(),
                figure(runs, pick, "test", "bits_per_byte").format(".4f"),
                figure(runs, pick, "in_domain", "active_params").format(".2f", 1e-6, "M"),
                figure(runs, pick, "in_domain", "mlp_active").format(".0f", 100, "%"),
            ]
            scored = [r for r in runs if "zero_shot" in r]
            at_point = label == "operating point" or runs[0]["regime"] != "dsmoe"
            cells.append(
                stat(scored, lambda r: statistics.fmean(r["zero_shot"].values())).format(".1f")
                if scored and at_point
                else "-"
            )
            lines.append(f"| {name} | {len(runs)} | {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def zero_shot_table(results: dict[str, dict]) -> str:
    """Per-task accuracy (percent, mean over seeds) at each model's operating point."""
    lines = [
        "| Model | Seeds | " + " | ".join(c for _, c in TASK_COLUMNS) + " | Avg |",
        "|---|---:|" + "---:|" * (len(TASK_COLUMNS) + 1),
    ]
    for name, runs in by_model(results).items():
        scored = [r for r in runs if "zero_shot" in r]
        if not scored:
            continue
        cells = [stat(scored, lambda r, t=task: r["zero_shot"][t]).format(".1f") for task, _ in TASK_COLUMNS]
        avg = stat(scored, lambda r: statistics.fmean(r["zero_shot"].values())).format(".1f")
        lines.append(f"| {name} | {len(scored)} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines) + "\n"


def compare(a: Stat, b: Stat) -> tuple[float, str]:
    """Relative difference of means (a vs b) and whether it is significant by Welch's t-test (two-sided, 5%).

    A 2-standard-error rule would call far too much significant with three seeds a side (about 2 degrees of freedom,
    where a 5% test needs |t| > 4.3). Where one side has a single seed, its spread is taken to be the other side's
    relative to its mean (the same coefficient of variation), with the other side's degrees of freedom, and the
    verdict says so; with a single seed on both sides there is no verdict."""
    from scipy import stats

    diff = a.mean / b.mean - 1.0
    if a.sd is None and b.sd is None:
        return diff, "spread unknown (one seed each)"
    relative = a.sd / a.mean if a.sd is not None else b.sd / b.mean  # type: ignore[operator]
    var_a = (a.sd if a.sd is not None else relative * a.mean) ** 2 / a.n
    var_b = (b.sd if b.sd is not None else relative * b.mean) ** 2 / b.n
    if var_a + var_b == 0:
        return diff, "no spread (every seed gave the same figure)"
    # Welch-Satterthwaite; a one-seed side's assumed variance carries the other side's degrees of freedom
    dof_a = a.n - 1 if a.sd is not None else b.n - 1
    dof_b = b.n - 1 if b.sd is not None else a.n - 1
    dof = (var_a + var_b) ** 2 / (var_a**2 / dof_a + var_b**2 / dof_b)
    t = (a.mean - b.mean) / math.sqrt(var_a + var_b)
    p = 2 * float(stats.t.sf(abs(t), dof))
    note = (
        ""
        if a.sd is not None and b.sd is not None
        else f"; one seed, spread assumed {relative:.1%} as the other's"
    )
    verdict = "significant" if p < 0.05 else "not significant"
    return diff, f"{verdict} (Welch t = {t:.2f}, df {dof:.1f}, p = {p:.2f}{note})"


def comparisons(results: dict[str, dict]) -> str:
    """Every DS-MoE model, as trained and at its operating point, against every other model as trained, on
    in-domain and Wikipedia token perplexity."""
    groups = by_model(results)
    lines = [
        "| DS-MoE model, setting | vs | Active params | In-domain token PPL | Verdict | Wikipedia token PPL | "
        "Verdict |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for name, runs in groups.items():
        if runs[0]["regime"] != "dsmoe":
            continue
        for label, pick in setting_rows(runs).items():
            for other, other_runs in groups.items():
                if other_runs[0]["regime"] == "dsmoe":
                    continue
                cells = []
                for text in ("in_domain", "test"):
                    mine = figure(runs, pick, text, "token_perplexity")
                    theirs = figure(other_runs, _as_trained, text, "token_perplexity")
                    diff, verdict = compare(mine, theirs)
                    cells += [f"{diff:+.1%}", verdict]
                share = (
                    figure(runs, pick, "in_domain", "active_params").mean
                    / figure(other_runs, _as_trained, "in_domain", "active_params").mean
                )
                lines.append(f"| {name}, {label} | {other} | {share:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sweep_points(runs: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Each sweep point's label and its entries over the seeds (every seed sweeps the same points)."""
    return [
        (
            {k: v for k, v in runs[0]["sweep"][i]["dev"].items() if k in ("threshold", "topk")},
            [r["sweep"][i] for r in runs],
        )
        for i in range(len(runs[0]["sweep"]))
    ]


def ablation(results: dict[str, dict]) -> str:
    """Table 4: each DS-MoE model over the sparsity sweep, with its alpha_mlp."""
    lines = [
        "| Model | alpha_mlp | Setting | Active params | Active MLP | In-domain token PPL | Wikipedia token PPL |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, runs in by_model(results).items():
        if runs[0]["regime"] != "dsmoe":
            continue
        for label, points in _sweep_points(runs):
            setting = ", ".join(f"{k} {v:g}" for k, v in label.items())
            lines.append(
                f"| {name} | {runs[0]['alpha_mlp']:g} | {setting} | "
                f"{Stat([p['in_domain']['active_params'] for p in points]).format('.2f', 1e-6, 'M')} | "
                f"{Stat([p['in_domain']['mlp_active'] for p in points]).format('.0f', 100, '%')} | "
                f"{Stat([p['in_domain']['token_perplexity'] for p in points]).format()} | "
                f"{Stat([p['test']['token_perplexity'] for p in points]).format()} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    """In-domain token perplexity against active parameters: each model as trained (a star) and DS-MoE's sweep
    curves; means over seeds with their standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def point(entries: list[dict]) -> tuple[float, float, float]:
        ppl = Stat([e["in_domain"]["token_perplexity"] for e in entries])
        return Stat([e["in_domain"]["active_params"] for e in entries]).mean / 1e6, ppl.mean, ppl.sd or 0.0

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in by_model(results).items():
        x, y, err = point([r["trained"] for r in runs])
        ax.errorbar(
            x, y, yerr=err, marker="*", markersize=12, linestyle="none", label=f"{name} ({len(runs)})"
        )
        if runs[0]["regime"] != "dsmoe":
            continue
        for kind in ("threshold", "topk"):
            xs = sorted(
                (point(entries) for label, entries in _sweep_points(runs) if kind in label),
                key=lambda p: p[0],
            )
            if xs:
                ax.errorbar(
                    [p[0] for p in xs],
                    [p[1] for p in xs],
                    yerr=[p[2] for p in xs],
                    marker="o",
                    label=f"{name} {kind}",
                )
    ax.set_xlabel("active non-embedding parameters (M)")
    ax.set_ylabel("in-domain token perplexity")
    ax.set_title(
        "Perplexity vs active parameters\n(paper Figs. 3-4, CPU scale; seeds in brackets)", fontsize=10
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_tables(results: dict[str, dict], out: Path) -> None:
    """table.md (Table 3, zero-shot and comparisons), ablation.md (Table 4) and perplexity_vs_active.png."""
    if not results:
        return
    write_atomic(
        out / "table.md",
        "## Table 3\n\n"
        + table3(results)
        + "\n## Zero-shot, at the operating point\n\n"
        + zero_shot_table(results)
        + "\n## DS-MoE against the baselines\n\n"
        + comparisons(results),
    )
    write_atomic(out / "ablation.md", ablation(results))
    plot(results, out / "perplexity_vs_active.png")
