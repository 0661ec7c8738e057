"""`dsmoe tune`: per-layer sparse settings (attention and MLP) that use as few active parameters -- or as little
decode time -- as a perplexity budget allows: dev perplexity <= (1 + budget) x the model's as-trained perplexity.

The search, all on the dev split:

1. **Sensitivity** (one sweep per router): every layer alone at every level of the grid (an eps of ``threshold``,
   or a K of ``topk``), all other layers as trained. Each run gives that layer's perplexity cost (the change of the
   dev log-likelihood) and its measured share of active experts.
2. **Path**: starting from the trained model, greedily raise the one layer whose next level (any higher level)
   saves the most active parameters per unit of predicted cost, until every layer is at the sparsest level. The
   costs of the layers are assumed to add up; the path is ordered, not yet checked.
3. **Check**: bisection along the path for its sparsest point whose *measured* dev perplexity is within the
   budget (about log2 of the path length evaluations, the first probe where the additive prediction says).
4. **Global baseline**: the same eps (or level) on every layer, each measured on dev; the best within the budget.
5. **From the global setting**: a second greedy path that starts at the best global setting and raises layers
   beyond it, checked by bisection the same way (uniform sparsity is sometimes the better start).
   When no per-layer point is better on the objective, the global setting is returned and says so.

``objective="latency"``: the candidates (every measured point within the budget along the path, the chosen point
with its barely-sparse layers back to dense, the best global setting and the trained model) are timed decoding one
sequence with the KV cache, and the fastest is returned: on a CPU, a layer that drops a few narrow experts can be
slower than its dense matrix product.

The dev split chooses; the test split (never used for choosing) is what ``report`` measures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.evaluation.text import evaluate_text
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting

if TYPE_CHECKING:
    from dsmoe.model.transformer import Transformer

TUNE_STRATEGIES = ("threshold", "threshold_topk", "topk")
OBJECTIVES = ("params", "latency")
METRICS = ("word", "token", "byte")
DEFAULT_THRESHOLDS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
K_FRACTIONS = (0.75, 0.5, 0.375, 0.25, 0.125)

Layers = list[SparseSetting | None]


@dataclass(frozen=True)
class TuneOptions:
    budget: float  # allowed relative perplexity increase, e.g. 0.02
    strategy: str = "threshold"
    values: tuple[float, ...] | None = None  # eps grid (threshold strategies); None: DEFAULT_THRESHOLDS
    kinds: tuple[str, ...] = ("att", "mlp")
    objective: str = "params"
    metric: str = "token"
    batch_size: int = 16
    max_len: int | None = None
    latency_tokens: int = 32  # decoded tokens per latency measurement
    latency_repeats: int = 3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.budget) and 0 <= self.budget <= 10):
            raise ConfigError(
                f"--budget {self.budget} must be a relative increase in [0, 10], e.g. 0.02 for 2%"
            )
        if self.strategy not in TUNE_STRATEGIES:
            raise ConfigError(f"--strategy {self.strategy!r}: choose one of {', '.join(TUNE_STRATEGIES)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.metric not in METRICS:
            raise ConfigError(f"--metric {self.metric!r}: choose one of {', '.join(METRICS)}")
        bad = [k for k in self.kinds if k not in ("att", "mlp")]
        if bad or not self.kinds:
            raise ConfigError(f"--kinds {','.join(self.kinds)}: give att, mlp or att,mlp")
        if self.values is not None:
            if self.strategy == "topk":
                raise ConfigError(
                    "--thresholds is for the threshold strategies; topk tunes K over a fixed grid"
                )
            if not self.values or any(not (math.isfinite(v) and v > 0) for v in self.values):
                raise ConfigError(f"--thresholds {list(self.values)}: give eps values > 0")


def levels(opts: TuneOptions, n_experts: int) -> list[SparseSetting]:
    """The settings one layer may take, from the least to the most sparse."""
    if opts.strategy == "topk":
        ks = sorted({max(1, round(n_experts * f)) for f in K_FRACTIONS if round(n_experts * f) < n_experts})
        return [SparseSetting("topk", k=k) for k in sorted(set(ks) | {1}, reverse=True)]
    values = sorted(set(opts.values or DEFAULT_THRESHOLDS))
    return [SparseSetting(opts.strategy, threshold=float(v)) for v in values if v <= n_experts]


@dataclass
class Measured:
    """One evaluation on dev: the settings and what they gave."""

    att: Layers
    mlp: Layers
    result: dict
    latency: float | None = None  # seconds per decoded token

    def perplexity(self, metric: str) -> float:
        return self.result[f"{metric}_perplexity"]


@dataclass
class Search:
    """Everything the search measured, for the settings file's ``meta`` and for tests."""

    reference: Measured
    limit: float  # the largest dev perplexity within the budget
    sensitivity: dict[str, list[list[dict]]] = field(
        default_factory=dict
    )  # kind -> layer -> level -> numbers
    path: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, layer, level) moves, in order
    global_path: list[tuple[str, int, int]] = field(
        default_factory=list
    )  # moves beyond the best global setting
    probes: list[dict] = field(default_factory=list)  # bisection: path index, perplexity, active params
    global_points: list[dict] = field(default_factory=list)
    evaluations: int = 0


def tune(
    model: Transformer,
    tokenizer,
    dev_docs: list[str],
    opts: TuneOptions,
    progress: Callable[[str], None] | None = None,
    planned: Callable[[int], None] | None = None,
    memo: dict | None = None,
) -> tuple[Measured, Measured | None, Search]:
    """(chosen per-layer settings, best global setting within the budget or None, the search record).
    ``progress(what)`` is called after every evaluation, ``planned(n)`` once with about how many there will be.
    ``memo``: a dict shared by calls on the same model and dev documents (e.g. one per budget), so that a setting
    measured once is not measured again; ``Search.evaluations`` counts the evaluations this call ran."""
    cfg = model.cfg
    kinds = [k for k in opts.kinds if (cfg.has_att_router if k == "att" else cfg.has_mlp_router)]
    if not kinds:
        raise ConfigError("this model has no router (one expert per layer): there is nothing to tune")
    n_exp = {"att": cfg.n_att_experts, "mlp": cfg.n_mlp_experts}
    grid = {k: levels(opts, n_exp[k]) for k in kinds}
    if any(not g for g in grid.values()):
        raise ConfigError(
            f"no threshold in {opts.values} is <= the experts of a layer: give smaller --thresholds"
        )

    cache = {} if memo is None else memo

    def evaluate(att: Layers, mlp: Layers, what: str) -> Measured:
        key = (tuple(att), tuple(mlp))
        if key not in cache:
            plan = SparsePlan.build(cfg, att, mlp)
            cache[key] = evaluate_text(
                model,
                tokenizer,
                dev_docs,
                plan,
                batch_size=opts.batch_size,
                max_len=opts.max_len,
                progress=progress is not None,
            )
            search.evaluations += 1
        if progress is not None:
            progress(what)
        return Measured(list(att), list(mlp), cache[key])

    if planned is not None:
        n_sens = sum(len(grid[k]) for k in kinds) * cfg.n_layers
        n_global = max(len(g) for g in grid.values())
        planned(1 + n_sens + 2 * math.ceil(math.log2(n_sens + 2)) + n_global)
    trained: Layers = [None] * cfg.n_layers
    search = Search(reference=Measured(trained, trained, {}), limit=0.0)
    reference = evaluate(trained, trained, "as trained")
    search.reference = reference
    search.limit = (1 + opts.budget) * reference.perplexity(opts.metric)
    counts_of = _count_reader(cfg)
    ref_counts = counts_of(reference.result)

    # 1. sensitivity: each layer alone at each level
    for kind in kinds:
        search.sensitivity[kind] = []
        for layer in range(cfg.n_layers):
            row = []
            for setting in grid[kind]:
                att, mlp = list(trained), list(trained)
                (att if kind == "att" else mlp)[layer] = setting
                m = evaluate(att, mlp, f"{kind} layer {layer} {setting.describe()}")
                row.append(
                    {
                        "setting": setting.describe(),
                        "cost": reference.result["loglikelihood"] - m.result["loglikelihood"],
                        "active": counts_of(m.result)[kind][layer],
                    }
                )
            search.sensitivity[kind].append(row)

    # 2. the greedy path
    search.path = greedy_path(cfg, kinds, search.sensitivity, ref_counts)

    def settings_at(moves: Sequence[tuple[str, int, int]]) -> tuple[Layers, Layers]:
        chosen = {k: list(trained) for k in ("att", "mlp")}
        for kind, layer, level in moves:
            chosen[kind][layer] = grid[kind][level]
        return chosen["att"], chosen["mlp"]

    budget_nll = _allowed_loss(reference.result, opts.metric, opts.budget)

    def bisect(
        start: list[tuple[str, int, int]], path: list, base: Measured, name: str
    ) -> dict[int, Measured]:
        """3. Bisection for the sparsest point of ``start + path[:m]`` within the budget (``base`` is m = 0, known
        to be within), first probing where the additive prediction says. Returns the points found within."""
        predicted = max(
            (
                i
                for i in range(1, len(path) + 1)
                if _path_cost(search.sensitivity, start + path[:i]) <= budget_nll
            ),
            default=0,
        )
        feasible: dict[int, Measured] = {0: base}
        lo, hi = 0, len(path) + 1
        probe = predicted if 0 < predicted < hi else (lo + hi) // 2
        while hi - lo > 1:
            if not lo < probe < hi:
                probe = (lo + hi) // 2
            m = evaluate(*settings_at(start + path[:probe]), f"check {name} point {probe}/{len(path)}")
            ok = m.perplexity(opts.metric) <= search.limit
            search.probes.append(
                {
                    "path": name,
                    "point": probe,
                    "perplexity": m.perplexity(opts.metric),
                    "active_params": m.result["active_params"],
                    "within": ok,
                }
            )
            if ok:
                lo, feasible[probe] = probe, m
            else:
                hi = probe
            probe = (lo + hi) // 2
        return feasible

    feasible = bisect([], search.path, reference, "trained->sparse")
    best_path = feasible[max(feasible)]

    # 4. the best single global setting (same level on every tuned layer)
    best_global: Measured | None = None
    global_level = 0
    for level in range(max(len(g) for g in grid.values())):
        att, mlp = list(trained), list(trained)
        for kind in kinds:
            setting = grid[kind][min(level, len(grid[kind]) - 1)]
            if kind == "att":
                att = [setting] * cfg.n_layers
            else:
                mlp = [setting] * cfg.n_layers
        m = evaluate(att, mlp, f"global {describe_global(att, mlp)}")
        ok = m.perplexity(opts.metric) <= search.limit
        search.global_points.append(
            {
                "setting": describe_global(att, mlp),
                "perplexity": m.perplexity(opts.metric),
                "active_params": m.result["active_params"],
                "within": ok,
            }
        )
        if ok and (best_global is None or m.result["active_params"] < best_global.result["active_params"]):
            best_global, global_level = m, level

    # 5. a second path from the best global setting: per-layer moves beyond it (costs from the same sensitivity
    # sweep), checked by bisection the same way; where uniform sparsity is the better start, this finds more
    if best_global is not None:
        start = [
            (k, layer, min(global_level, len(grid[k]) - 1)) for k in kinds for layer in range(cfg.n_layers)
        ]
        current = {(k, layer): level for k, layer, level in start}
        search.global_path = greedy_path(cfg, kinds, search.sensitivity, ref_counts, start=current)
        from_global = bisect(start, search.global_path, best_global, "global->sparse")
        feasible.update({len(search.path) + 1 + i: m for i, m in from_global.items() if i > 0})
        beyond = from_global[max(from_global)]
        if beyond.result["active_params"] < best_path.result["active_params"]:
            best_path = beyond

    if opts.objective == "params":
        chosen = best_path
        if best_global is not None and best_global.result["active_params"] < chosen.result["active_params"]:
            chosen = best_global
        return chosen, best_global, search

    # latency: time every candidate within the budget, keep the fastest
    candidates = list(feasible.values())
    thinned = _dense_where_barely_sparse(best_path, n_exp, counts_of)
    if thinned is not None:
        m = evaluate(thinned[0], thinned[1], "check mostly-dense layers back to dense")
        if m.perplexity(opts.metric) <= search.limit:
            candidates.append(m)
    if best_global is not None:
        candidates.append(best_global)
    prompt = latency_prompt(tokenizer, dev_docs, cfg.max_seq_len, opts.latency_tokens)
    for c in candidates:
        c.latency = decode_seconds_per_token(
            model, prompt, c.att, c.mlp, opts.latency_tokens, opts.latency_repeats
        )
        if progress is not None:
            progress("latency")
    chosen = min(candidates, key=lambda c: c.latency or math.inf)
    return chosen, best_global, search


def _count_reader(cfg: ModelConfig) -> Callable[[dict], dict[str, list[float]]]:
    n_exp = {"att": cfg.n_att_experts, "mlp": cfg.n_mlp_experts}

    def counts(result: dict) -> dict[str, list[float]]:
        return {k: [layer["mean"] * n_exp[k] for layer in result["layers"][k]] for k in ("att", "mlp")}

    return counts


def _allowed_loss(reference: dict, metric: str, budget: float) -> float:
    """The log-likelihood the budget allows to lose: ppl = exp(-loglik / count), so (1+b) x ppl is count*log(1+b)."""
    count = {"word": reference["words"], "token": reference["tokens"], "byte": reference["bytes"]}[metric]
    return count * math.log1p(budget)


def _path_cost(sensitivity: dict, moves: Sequence[tuple[str, int, int]]) -> float:
    """Predicted log-likelihood lost after ``moves``: each layer's cost at its last level, summed."""
    last: dict[tuple[str, int], int] = {}
    for kind, layer, level in moves:
        last[kind, layer] = level
    return sum(sensitivity[kind][layer][level]["cost"] for (kind, layer), level in last.items())


def greedy_path(
    cfg: ModelConfig,
    kinds: Sequence[str],
    sensitivity: dict,
    ref_counts: dict[str, list[float]],
    start: dict[tuple[str, int], int] | None = None,
) -> list[tuple[str, int, int]]:
    """Moves (kind, layer, level) from the trained model (or from ``start``'s levels) to every layer at its
    sparsest level. Each move takes the
    layer and higher level that saves the most active parameters per unit of added cost (costs below a small floor
    count as the floor, so free savings come first, largest first)."""
    expert_params = {"att": cfg.att_expert_params, "mlp": cfg.mlp_expert_params}
    floor = 1e-6 + 1e-3 * max(
        (abs(c["cost"]) for k in kinds for row in sensitivity[k] for c in row), default=0.0
    )
    current: dict[tuple[str, int], int] = dict(start or {})  # level index; absent: as trained
    path: list[tuple[str, int, int]] = []
    while True:
        best = None
        for kind in kinds:
            for layer, row in enumerate(sensitivity[kind]):
                cur = current.get((kind, layer))
                cur_active = ref_counts[kind][layer] if cur is None else row[cur]["active"]
                cur_cost = 0.0 if cur is None else row[cur]["cost"]
                for level in range((-1 if cur is None else cur) + 1, len(row)):
                    saving = (cur_active - row[level]["active"]) * expert_params[kind]
                    if saving <= 0:
                        continue
                    ratio = saving / max(row[level]["cost"] - cur_cost, floor)
                    if best is None or ratio > best[0]:
                        best = (ratio, kind, layer, level)
        if best is None:
            return path
        _, kind, layer, level = best
        current[kind, layer] = level
        path.append((kind, layer, level))


def _dense_where_barely_sparse(point: Measured, n_exp: dict[str, int], counts_of, share: float = 0.75):
    """``point`` with every layer that still uses more than ``share`` of its experts back to as trained (None when
    there is none): such a layer saves little and, on a CPU, may be slower than its dense product."""
    counts = counts_of(point.result)
    att, mlp = list(point.att), list(point.mlp)
    changed = False
    for kind, layers in (("att", att), ("mlp", mlp)):
        for i, setting in enumerate(layers):
            if setting is not None and counts[kind][i] > share * n_exp[kind]:
                layers[i], changed = None, True
    return (att, mlp) if changed else None


def describe_global(att: Layers, mlp: Layers) -> str:
    a = att[0].describe() if att[0] is not None else "trained"
    m = mlp[0].describe() if mlp[0] is not None else "trained"
    return f"att {a}, mlp {m}"


def latency_prompt(tokenizer, docs: Sequence[str], max_seq_len: int, n_new: int) -> list[int]:
    """Real dev tokens: a short prompt plus the tokens fed back while decoding (teacher forcing, so every candidate
    decodes the same sequence)."""
    want = min(max_seq_len, 16 + n_new)
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc).ids
        if len(ids) >= want:
            break
    if len(ids) < 2:
        raise ConfigError("the dev text has fewer than 2 tokens: too short to time decoding")
    return ids[:want]


def decode_seconds_per_token(
    model: Transformer, ids: Sequence[int], att: Layers, mlp: Layers, n_new: int, repeats: int
) -> float:
    """Best of ``repeats`` mean seconds per decoded token (batch of one, KV cache), feeding ``ids`` back one at a
    time after a prefill of the rest."""
    import torch

    plan = SparsePlan.build(model.cfg, att, mlp)
    device = next(model.parameters()).device
    seq = torch.tensor(list(ids), device=device)[None]
    n_new = max(1, min(n_new, seq.shape[1] - 1))
    start = seq.shape[1] - n_new
    best = math.inf
    with torch.inference_mode():
        for _ in range(max(1, repeats)):
            cache = model.new_cache(1, seq.shape[1])
            model(seq[:, :start], plan=plan, cache=cache, last_only=True)
            t0 = time.perf_counter()
            for pos in range(start, seq.shape[1]):
                model(seq[:, pos : pos + 1], plan=plan, cache=cache, start_pos=pos, last_only=True)
            best = min(best, (time.perf_counter() - t0) / n_new)
    return best


def summary(m: Measured, dense_params: float) -> dict[str, Any]:
    r = m.result
    out = {
        key: r[key]
        for key in (
            "word_perplexity",
            "token_perplexity",
            "bits_per_byte",
            "active_params",
            "active_hidden",
            "tokens",
        )
    }
    out["active_share"] = r["active_params"] / dense_params
    if m.latency is not None:
        out["seconds_per_token"] = m.latency
    return out
