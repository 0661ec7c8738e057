"""`dsmoe repro` end to end at toy scale: two configs, two seeds, tiny training, evaluation on the corpus's held-out
documents and a dev/test split of other text, tables with spread over seeds, plot, resume, --only."""

import json
import math
from argparse import Namespace

import pytest
import yaml
from helpers import prepared_data, tiny_model_dict

from dsmoe.config import ConfigError
from dsmoe.data.loader import held_out_documents, read_index
from dsmoe.evaluation.repro import run_repro, select_runs
from dsmoe.evaluation.repro_tables import Stat, compare


def test_repro_trains_evaluates_and_writes_tables(tmp_path):
    data = prepared_data(tmp_path / "corpus")
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    (wiki / "docs.jsonl").write_text(
        "\n".join(json.dumps({"text": "The old man crosses the bridge. " * (i + 3)}) for i in range(4)) + "\n"
    )
    configs = tmp_path / "configs"
    configs.mkdir()
    common = dict(
        data=str(data),
        seq_len=32,
        micro_batch_size=4,
        global_batch_tokens=128,
        total_tokens=384,
        warmup_tokens=128,
        eval_every=0,
        ckpt_every=3,
        dtype="fp32",
    )
    for name, regime in (("dense", "dense"), ("ds-moe", "dsmoe")):
        (configs / f"{name}.yaml").write_text(yaml.safe_dump({**common, "model": tiny_model_dict(regime)}))
    args = Namespace(
        configs=str(configs),
        out=str(tmp_path / "out"),
        corpus="unused",
        vocab=384,
        eval_docs=4,
        eval_text=str(wiki / "docs.jsonl"),
        thresholds=[0.5, 1.5],
        ks=[2],
        task_limit=0,
        batch_size=4,
        seeds=[0, 1],
        only=["dense:0", "ds-moe"],
        overrides=[],
    )
    out = tmp_path / "out"
    results = run_repro(args)
    assert set(results) == {"dense/seed-0", "ds-moe/seed-0", "ds-moe/seed-1"}  # --only
    dense, ds0, ds1 = results["dense/seed-0"], results["ds-moe/seed-0"], results["ds-moe/seed-1"]
    # the seed reaches training: another initialisation, another model
    assert ds0["trained"]["in_domain"]["token_perplexity"] != ds1["trained"]["in_domain"]["token_perplexity"]
    # in-domain: exactly the corpus's val documents
    assert dense["documents"] == {"in_domain": read_index(data)["documents"]["val"], "dev": 2, "test": 2}
    assert dense["trained"]["in_domain"]["active_hidden"] == 1.0 and "sweep" not in dense
    sweep = ds0["sweep"]
    assert [p["test"].get("threshold", p["test"].get("topk")) for p in sweep] == [0.5, 1.5, 2]
    point = ds0["operating_point"]
    assert point in sweep and "threshold" in point["dev"]  # chosen on dev, among the thresholds
    assert point["in_domain"]["active_params"] <= ds0["trained"]["in_domain"]["active_params"]
    assert ds0["trained"]["dev"] != ds0["trained"]["test"]
    table = (out / "table.md").read_text()
    assert "| dense | 1 | as trained |" in table and "| ds-moe | 2 | operating point" not in table
    assert "| ds-moe | 2 | threshold " in table and " ± " in table  # two seeds: a spread
    assert "one seed, spread assumed" in table and "Welch t" in table  # the one-seed dense: a spread assumed
    assert "| ds-moe | 0.01 | threshold 0.5 |" in (out / "ablation.md").read_text()
    assert (out / "perplexity_vs_active.png").stat().st_size > 1000

    before = (out / "results.json").read_text()
    run_repro(args)  # everything done: nothing retrained or re-evaluated
    assert (out / "results.json").read_text() == before
    run_repro(Namespace(**{**vars(args), "only": ["dense:1"]}))  # a later call adds a run, keeps the others
    again = json.loads((out / "results.json").read_text())
    assert set(again) == set(results) | {"dense/seed-1"}
    assert again["ds-moe/seed-0"] == ds0
    # a changed evaluation setting is recomputed, not served from the cache
    run_repro(Namespace(**{**vars(args), "only": ["ds-moe:0"], "thresholds": [0.5]}))
    again = json.loads((out / "results.json").read_text())
    assert [p["test"].get("threshold", p["test"].get("topk")) for p in again["ds-moe/seed-0"]["sweep"]] == [
        0.5,
        2,
    ]


def test_held_out_documents_are_the_val_split(tmp_path):
    data = prepared_data(tmp_path / "corpus")
    docs = held_out_documents(data)
    assert len(docs) == read_index(data)["documents"]["val"] > 0
    # ... and they are held out: the val shard decodes to them, the train shard does not contain them
    from dsmoe.data.tokenizer import load_tokenizer

    tok = load_tokenizer(data / "tokenizer.json")
    import numpy as np

    val = np.fromfile(next(data.glob("val-*.bin")), dtype=read_index(data)["dtype"])
    assert tok.decode(val.tolist(), skip_special_tokens=True).replace(" ", "") == "".join(docs).replace(
        " ", ""
    )
    (tmp_path / "corpus" / "docs.jsonl").write_text(json.dumps({"text": "changed"}) + "\n")
    with pytest.raises(Exception, match="changed since it was prepared"):
        held_out_documents(data)


def test_select_runs_and_bad_only():
    models, seeds = ["dense", "ds-moe"], [0, 1, 2]
    assert select_runs(models, seeds, []) == [(m, s) for m in models for s in seeds]
    assert select_runs(models, seeds, ["ds-moe:1", "dense"]) == [
        ("ds-moe", 1),
        ("dense", 0),
        ("dense", 1),
        ("dense", 2),
    ]
    assert select_runs(models, seeds, ["dense:7"]) == [
        ("dense", 7)
    ]  # a seed beyond --seeds, asked for by name
    with pytest.raises(ConfigError, match="no config 'smoe'"):
        select_runs(models, seeds, ["smoe"])
    with pytest.raises(ConfigError, match="whole number"):
        select_runs(models, seeds, ["dense:x"])


def test_compare_is_welchs_t_test_and_says_when_a_spread_is_assumed():
    from scipy import stats

    a_values, b_values = [10.0, 10.2, 9.8], [12.0, 12.1, 11.9]
    a, b = Stat(a_values), Stat(b_values)
    diff, verdict = compare(a, b)
    reference = stats.ttest_ind(a_values, b_values, equal_var=False)
    assert diff == pytest.approx(10.0 / 12.0 - 1)
    expected = f"Welch t = {reference.statistic:.2f}, df {reference.df:.1f}, p = {reference.pvalue:.2f}"
    assert verdict == f"significant ({expected})"
    # three seeds a side, 2.6 standard errors apart: a 2-SE rule would call it, a t-test with ~2 df does not
    wide = [10.0, 12.0, 14.0]
    verdict = compare(Stat(wide), Stat([15.0, 15.1, 14.9]))[1]
    assert (
        verdict.startswith("not significant")
        and stats.ttest_ind(wide, [15.0, 15.1, 14.9], equal_var=False).pvalue > 0.05
    )
    assert compare(Stat([10.0]), Stat([11.0]))[1] == "spread unknown (one seed each)"
    assert compare(Stat([10.0, 10.0]), Stat([11.0]))[1] == "no spread (every seed gave the same figure)"
    # one seed against three: its spread taken as b's relative spread (0.1 / 12 of its mean), b's 2 degrees of freedom
    var_one, var_b = (0.1 / 12 * 10) ** 2, 0.1**2 / 3
    t = (10.0 - 12.0) / math.sqrt(var_one + var_b)
    dof = (var_one + var_b) ** 2 / (var_one**2 / 2 + var_b**2 / 2)
    p = 2 * stats.t.sf(abs(t), dof)
    assert compare(Stat([10.0]), b)[1] == (
        f"significant (Welch t = {t:.2f}, df {dof:.1f}, p = {p:.2f}; one seed, spread assumed 0.8% as the other's)"
    )
    assert compare(Stat([11.99]), b)[1].startswith("not significant")
