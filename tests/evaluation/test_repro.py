"""`dsmoe repro` end to end at toy scale: two configs, tiny training, evaluation, tables, plot, resume."""

import json
from argparse import Namespace

import yaml
from helpers import prepared_data, tiny_model_dict

from dsmoe.evaluation.repro import run_repro


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
        overrides=[],
    )
    results = run_repro(args)
    assert set(results) == {"dense", "ds-moe"}
    assert results["dense"]["trained"]["active_hidden"] == 1.0 and "sweep" not in results["dense"]
    sweep = results["ds-moe"]["sweep"]
    assert [r.get("threshold", r.get("topk")) for r in sweep] == [0.5, 1.5, 2]
    assert results["ds-moe"]["sparse"]["active_params"] <= results["ds-moe"]["trained"]["active_params"]
    out = tmp_path / "out"
    table = (out / "table.md").read_text()
    assert "| dense |" in table and "| ds-moe |" in table
    assert "| ds-moe |" in (out / "ablation.md").read_text()
    assert (out / "perplexity_vs_active.png").stat().st_size > 1000
    before = (out / "results.json").read_text()
    run_repro(args)  # everything done: nothing retrained or re-evaluated
    assert (out / "results.json").read_text() == before
    # chosen on dev, reported on test: two disjoint halves of the held-out documents
    ds = results["ds-moe"]
    assert ds["dev"]["documents"] == ds["test_documents"] == 2
    chosen = ds["sparse"]["threshold"]
    assert any(r.get("threshold") == chosen for r in ds["dev"]["sweep"])
    assert ds["dev"]["trained"] != ds["trained"]
    # a changed evaluation setting is recomputed, not served from the cache
    run_repro(Namespace(**{**vars(args), "thresholds": [0.5]}))
    again = json.loads((out / "results.json").read_text())
    assert [r.get("threshold", r.get("topk")) for r in again["ds-moe"]["sweep"]] == [0.5, 2]
