"""`dsmoe tune` on a tiny trained DS-MoE: the budget holds on dev, the result is never worse than the best global
threshold on the objective, test is reported on other documents, and the settings file works in eval, sweep and
the lm-eval model (the Hugging Face consumers are in tests/hf/test_hf_settings_file.py)."""

import json

import pytest
from helpers import synthetic_corpus

from dsmoe.cli import main
from dsmoe.config import ConfigError
from dsmoe.evaluation.repro import split_dev_test
from dsmoe.evaluation.text import evaluate_text
from dsmoe.evaluation.tune import TuneOptions, greedy_path, levels
from dsmoe.model.settings_file import load_plan
from dsmoe.training.checkpoint import checkpoint_config, load_pretrained

BUDGETS = (0.02, 0.1)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Documents the model never trained on (another seed), as a JSONL file, and their dev / test halves."""
    docs = synthetic_corpus(n_docs=40, seed=11)
    path = tmp_path_factory.mktemp("held-out") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, *split_dev_test(docs)


def tune_argv(checkpoint, held_out) -> list[str]:
    return ["tune", "--checkpoint", str(checkpoint), "--text", str(held_out[0])]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def tuned(tiny_trained_checkpoint, held_out, tmp_path_factory):
    """budget -> (settings file, record) of `dsmoe tune --objective params`."""
    out = {}
    root = tmp_path_factory.mktemp("tuned")
    for budget in BUDGETS:
        path = root / f"settings-{budget}.json"
        argv = tune_argv(tiny_trained_checkpoint, held_out)
        assert main([*argv, "--budget", str(budget), "--out", str(path)]) == 0
        out[budget] = path, json.loads(path.read_text())["meta"]
    return out


@pytest.mark.parametrize("budget", BUDGETS)
def test_tuned_settings_meet_the_budget_on_dev(tiny_trained_checkpoint, held_out, tuned, budget):
    path, record = tuned[budget]
    model, tokenizer = load_pretrained(tiny_trained_checkpoint)
    plan = load_plan(path, model.cfg)
    dev = held_out[1]
    trained = evaluate_text(model, tokenizer, dev)
    sparse = evaluate_text(model, tokenizer, dev, plan)  # measured again, from the file alone
    assert sparse["token_perplexity"] <= (1 + budget) * trained["token_perplexity"] * (
        1 + 1e-9
    )  # the default metric
    assert sparse["active_params"] == pytest.approx(record["dev"]["tuned"]["active_params"])
    assert sparse["active_params"] < trained["active_params"]  # the budget buys sparsity on this model


@pytest.mark.parametrize("budget", BUDGETS)
def test_never_worse_than_the_best_global_threshold(tuned, budget):
    _, record = tuned[budget]
    best_global = record["dev"]["global"]
    assert best_global is not None, "some global threshold meets these budgets on this model"
    assert record["dev"]["tuned"]["active_params"] <= best_global["active_params"]
    within = [p for p in record["search"]["global_points"] if p["within"]]
    assert best_global["active_params"] == min(p["active_params"] for p in within)
    # a bigger budget never buys fewer savings
    assert tuned[0.1][1]["dev"]["tuned"]["active_params"] <= tuned[0.02][1]["dev"]["tuned"]["active_params"]


def test_test_split_is_reported_on_other_documents(
    tiny_trained_checkpoint, held_out, tuned, tmp_path, capsys
):
    path, record = tuned[0.1]
    _, dev, test = held_out
    assert record["split"]["dev_documents"] == len(dev) and record["split"]["test_documents"] == len(test)
    assert not set(dev) & set(test)
    for name in ("trained", "global", "tuned"):
        assert {"word_perplexity", "bits_per_byte", "active_params"} <= set(record["test"][name])
    # dsmoe eval --settings on the test documents gives the reported test row
    test_file = write_jsonl(tmp_path / "test.jsonl", test)
    argv = ["eval", "--checkpoint", str(tiny_trained_checkpoint), "--text", str(test_file), "--json"]
    assert main([*argv, "--settings", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["word_perplexity"] == pytest.approx(record["test"]["tuned"]["word_perplexity"])
    assert result["active_params"] == pytest.approx(record["test"]["tuned"]["active_params"])
    assert result["mlp_strategy"] == load_plan(path, checkpoint_config(tiny_trained_checkpoint)).describe(
        "mlp"
    )


def test_search_costs_a_small_multiple_of_a_sweep(tuned, tiny_trained_checkpoint):
    record = tuned[0.02][1]
    cfg = checkpoint_config(tiny_trained_checkpoint)
    grid = len(levels(TuneOptions(budget=0.02), cfg.n_mlp_experts))
    sensitivity = 2 * cfg.n_layers * grid  # every layer of both router kinds at every level
    assert record["search"]["evaluations"] <= 1 + sensitivity + grid + 2 * 8


def test_sweep_measures_the_settings_file(tiny_trained_checkpoint, held_out, tuned, tmp_path, capsys):
    path, record = tuned[0.1]
    test_file = write_jsonl(tmp_path / "test.jsonl", held_out[2])
    argv = [
        "sweep",
        "--checkpoint",
        str(tiny_trained_checkpoint),
        "--text",
        str(test_file),
        "--out",
        str(tmp_path / "s"),
    ]
    assert main([*argv, "--strategies", "threshold", "--thresholds", "1.0", "--settings", str(path)]) == 0
    capsys.readouterr()
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    point = [p for p in sweep["points"] if p["strategy"] == "settings"]
    assert len(point) == 1 and point[0]["label"] == f"per-layer settings {path.name}"
    assert point[0]["active_params"] == pytest.approx(record["test"]["tuned"]["active_params"])
    assert sweep["settings_file"] == str(path)


def test_lm_eval_model_reads_the_settings_file(tiny_trained_checkpoint, held_out, tuned):
    pytest.importorskip("lm_eval", reason="lm-eval is in the 'eval' extra")
    from dsmoe.evaluation.lm_eval_model import DSMoELM

    path, record = tuned[0.1]
    lm = DSMoELM(checkpoint=str(tiny_trained_checkpoint), settings=str(path), device="cpu")
    assert lm.plan == load_plan(path, lm.cfg).with_kernels("cpu")  # prepared for the CPU
    with pytest.raises(ConfigError, match="drop strategy"):
        DSMoELM(checkpoint=str(tiny_trained_checkpoint), settings=str(path), strategy="topk", k=2)


def test_latency_objective_is_never_slower_than_the_global_threshold(
    tiny_trained_checkpoint, held_out, tmp_path, capsys
):
    path = tmp_path / "latency.json"
    argv = [*tune_argv(tiny_trained_checkpoint, held_out), "--budget", "0.1"]
    assert main([*argv, "--objective", "latency", "--out", str(path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    dev = record["dev"]
    assert dev["tuned"]["token_perplexity"] <= dev["limit"]
    assert dev["tuned"]["seconds_per_token"] <= dev["global"]["seconds_per_token"]  # same timing run
    assert all("seconds_per_token" in row for row in record["test"].values())


def test_greedy_path_takes_free_savings_first_and_ends_fully_sparse():
    from helpers import small_config

    cfg = small_config(n_layers=2)
    row = lambda costs, actives: [{"cost": c, "active": a} for c, a in zip(costs, actives, strict=True)]  # noqa: E731
    sensitivity = {"mlp": [row([5.0, 9.0], [6, 2]), row([0.0, 1.0], [4, 1])]}
    path = greedy_path(cfg, ["mlp"], sensitivity, {"att": [4, 4], "mlp": [8, 8]})
    assert path[0] == ("mlp", 1, 0)  # free
    assert {(k, layer, lvl) for k, layer, lvl in path if lvl == 1} == {("mlp", 0, 1), ("mlp", 1, 1)}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "-0.1"], "must be a relative increase"),
        (["--budget", "0.02", "--kinds", "ffn"], "give att, mlp"),
        (
            ["--budget", "0.02", "--strategy", "topk", "--thresholds", "1"],
            "--thresholds is for the threshold",
        ),
        (["--budget", "0.02", "--thresholds", "0"], "give eps values > 0"),
    ],
)
def test_bad_arguments_fail_before_any_weight_loads(
    tiny_trained_checkpoint, held_out, extra, message, capsys, tmp_path
):
    argv = tune_argv(tiny_trained_checkpoint, held_out)
    assert main([*argv, "--out", str(tmp_path / "s.json"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_settings_flag_conflicts_with_strategy_flags(tiny_trained_checkpoint, held_out, tuned, capsys):
    path, _ = tuned[0.1]
    argv = ["eval", "--checkpoint", str(tiny_trained_checkpoint), "--text", str(held_out[0])]
    assert main([*argv, "--settings", str(path), "--strategy", "topk", "--k", "2"]) == 2
    assert "drop --strategy, --k or drop --settings" in capsys.readouterr().err


def test_topk_tuning_and_dev_tokens(tiny_trained_checkpoint, held_out, tmp_path, capsys):
    path = tmp_path / "topk.json"
    argv = [*tune_argv(tiny_trained_checkpoint, held_out), "--budget", "0.1"]
    assert main([*argv, "--strategy", "topk", "--dev-tokens", "600", "--out", str(path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["split"]["dev_documents"] < len(held_out[1])  # stopped once 600 tokens were in
    assert record["split"]["dev_tokens"] >= 600
    assert record["dev"]["tuned"]["token_perplexity"] <= record["dev"]["limit"]
    plan = load_plan(path, checkpoint_config(tiny_trained_checkpoint))
    assert all(s is None or s.strategy == "topk" for s in plan.att + plan.mlp)
    assert any(s is not None for s in plan.att + plan.mlp)
