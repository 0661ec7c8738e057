"""`dsmoe eval` and `dsmoe sweep` on a tiny checkpoint."""

import json
import shutil

import pytest

import dsmoe.data.sources as sources
import dsmoe.training.checkpoint as ckpt
from dsmoe.cli import main
from dsmoe.evaluation.sweep import markdown_table, sweep_grid


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.usefixtures("int8_on_this_cpu")
def test_eval_json_reports_perplexities_and_active_parameters(tiny_checkpoint, docs_file, capsys):
    dense = run_json(capsys, "eval", "--checkpoint", str(tiny_checkpoint), "--text", str(docs_file), "--json")
    for key in (
        "word_perplexity",
        "token_perplexity",
        "byte_perplexity",
        "bits_per_byte",
        "active_params",
        "active_hidden",
        "att_strategy",
        "mlp_strategy",
    ):
        assert key in dense
    assert dense["active_hidden"] == 1.0 and dense["active_params"] == dense["non_embedding_params"]
    sparse = run_json(
        capsys,
        "eval",
        "--checkpoint",
        str(tiny_checkpoint),
        "--text",
        str(docs_file),
        "--json",
        "--strategy",
        "topk",
        "--k",
        "2",
        "--att-strategy",
        "threshold",
        "--att-threshold",
        "1.0",
        "--batch-size",
        "3",
        "--max-docs",
        "5",
    )
    assert sparse["mlp_strategy"] == "topk(k=2)" and sparse["att_strategy"] == "threshold(eps=1.0)"
    assert sparse["active_params"] < dense["active_params"] and sparse["data"]["documents"] == 5
    assert [layer["mean"] for layer in sparse["layers"]["mlp"]] == [2 / 8, 2 / 8]
    int8 = run_json(
        capsys,
        "eval",
        "--checkpoint",
        str(tiny_checkpoint),
        "--text",
        str(docs_file),
        "--json",
        "--quantize",
        "int8",
    )
    assert dense["quantize"] == "none" and int8["quantize"] == "int8"
    assert int8["token_perplexity"] == pytest.approx(dense["token_perplexity"], rel=0.01)
    assert int8["token_perplexity"] != dense["token_perplexity"]


def test_eval_on_the_wikipedia_source_says_it_is_not_wikitext(
    tiny_checkpoint, docs_file, capsys, monkeypatch
):
    monkeypatch.setattr(sources, "fetch_corpus", lambda name, data_dir=None: [docs_file])
    out = run_json(capsys, "eval", "--checkpoint", str(tiny_checkpoint), "--source", "wikipedia", "--json")
    assert "not WikiText" in out["data"]["note"]


def test_eval_errors_name_the_problem(tiny_checkpoint, docs_file, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--text", str(docs_file)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(["eval", "--checkpoint", str(tiny_checkpoint), "--text", str(docs_file), "--strategy", "topk"])
        == 2
    )
    assert "strategy 'topk' needs an integer k" in capsys.readouterr().err


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if a checkpoint's weights are loaded."""

    def load_model_state(*args, **kwargs):
        raise AssertionError("the weights were loaded before the arguments were checked")

    monkeypatch.setattr(ckpt, "load_model_state", load_model_state)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategy", "topk", "--k", "9"], "mlp: strategy 'topk' needs an integer k in 1..8"),
        (["--strategy", "topk"], "got k=None; pass --k N"),
        (["--att-strategy", "topk"], "got k=None; pass --att-k N"),
        (["--max-len", "1000"], "--max-len 1000 must be in 1..48"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_eval_checks_its_arguments_before_loading_weights(
    tiny_checkpoint, docs_file, no_weights, capsys, argv, message
):
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--text", str(docs_file), *argv]) == 2
    assert message in capsys.readouterr().err


def test_eval_and_sweep_check_text_and_out_before_loading_weights(
    tiny_checkpoint, tmp_path, no_weights, capsys
):
    checkpoint = ["--checkpoint", str(tiny_checkpoint)]
    assert main(["eval", *checkpoint, "--text", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert (
        main(
            ["sweep", *checkpoint, "--text", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "file")]
        )
        == 2
    )
    assert "is a file" in capsys.readouterr().err
    assert main(["sweep", *checkpoint, "--text", "x", "--ks", "9", "--out", str(tmp_path / "s")]) == 2
    assert "--ks [9] outside 1..8" in capsys.readouterr().err


def test_a_run_folder_as_checkpoint_names_its_newest_checkpoint(tiny_checkpoint, docs_file, tmp_path, capsys):
    run = tmp_path / "run"
    for step in ("step-00000002", "step-00000010"):
        shutil.copytree(tiny_checkpoint, run / "checkpoints" / step)
    assert main(["eval", "--checkpoint", str(run), "--text", str(docs_file)]) == 2
    newest = run / "checkpoints" / "step-00000010"
    assert f"is a training run folder, not a checkpoint: pass its newest checkpoint, {newest}" in (
        capsys.readouterr().err
    )


def test_sweep_writes_json_plots_and_table(tiny_checkpoint, docs_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "--checkpoint",
                str(tiny_checkpoint),
                "--text",
                str(docs_file),
                "--out",
                str(out),
                "--thresholds",
                "0.5,1.5",
                "--ks",
                "8,2",
                "--layer-threshold",
                "0.9",
                "--max-docs",
                "6",
            ]
        )
        == 0
    )
    result = json.loads((out / "sweep.json").read_text())
    points = {(p["strategy"], p["value"]): p for p in result["points"]}
    assert set(points) == {
        ("dense", None),
        ("threshold", 0.5),
        ("threshold", 1.5),
        ("topk", 8),
        ("topk", 2),
        ("threshold_topk", 0.5),
        ("threshold_topk", 1.5),
    }
    dense = points[("dense", None)]
    # top-8 of 8 MLP experts is the dense computation through the sparse kernels
    assert points[("topk", 8)]["word_perplexity"] == pytest.approx(dense["word_perplexity"], rel=1e-5)
    assert points[("topk", 2)]["active_params"] < dense["active_params"]
    assert points[("threshold", 1.5)]["active_params"] <= points[("threshold", 0.5)]["active_params"]
    layers = result["layer_utilization"]["layers"]
    assert len(layers["att"]) == len(layers["mlp"]) == 2
    assert all(0 < s["min"] <= s["mean"] <= s["max"] <= 1 for kind in layers.values() for s in kind)
    for png in ("perplexity_vs_active.png", "layer_utilization.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert table.count("\n") == len(points) + 2 and "| tiny |" in table
    assert not list(out.glob(".*"))


def test_sweep_grid_checks_its_values():
    from dsmoe.config import ConfigError

    grid = sweep_grid(["topk", "threshold"], [1.0], [1, 3], n_mlp_experts=4)
    assert [p.label for p in grid] == [  # as eval's --strategy: the MLP routers, attention as trained
        "dense",
        "att trained, mlp topk(k=3)",
        "att trained, mlp topk(k=1)",
        "att trained, mlp threshold(eps=1.0)",
    ]
    same = sweep_grid(["topk", "threshold"], [1.0], [3], n_mlp_experts=4, att_same=True)
    assert [p.label for p in same][1:] == [
        "att trained, mlp topk(k=3)",
        "att threshold(eps=1.0), mlp threshold(eps=1.0)",
    ]
    with pytest.raises(ConfigError, match="outside"):
        sweep_grid(["topk"], [], [5], n_mlp_experts=4)
    with pytest.raises(ConfigError, match="unknown sweep strategy"):
        sweep_grid(["top2"], [], [], n_mlp_experts=4)
    row = {
        "label": "dense",
        "word_perplexity": 12.345,
        "token_perplexity": 5.0,
        "bits_per_byte": 1.25,
        "active_params": 2.5e9,
        "active_share": 0.625,
        "active_hidden": 0.5,
    }
    assert "| m | dense | 1.2500 | 5.00 | 12.35 | 2.50B | 62.5% | 50.0% |" in markdown_table("m", [row])


def test_an_smoe_is_scored_as_trained_unless_every_expert_is_asked_for(
    tiny_smoe_checkpoint, docs_file, capsys
):
    from dsmoe.evaluation.lm_eval_model import DSMoELM

    base = [
        "eval",
        "--checkpoint",
        str(tiny_smoe_checkpoint),
        "--text",
        str(docs_file),
        "--json",
        "--max-docs",
        "4",
    ]
    trained = run_json(capsys, *base)
    assert trained["mlp_strategy"] == "trained"
    assert [layer["mean"] for layer in trained["layers"]["mlp"]] == [2 / 8, 2 / 8]  # its top-2 of 8
    everything = run_json(capsys, *base, "--strategy", "dense")
    assert [layer["mean"] for layer in everything["layers"]["mlp"]] == [1.0, 1.0]
    assert everything["token_perplexity"] != trained["token_perplexity"]
    lm = DSMoELM(checkpoint=str(tiny_smoe_checkpoint), device="cpu")
    assert lm.plan.is_trained  # lm-eval runs it as trained too
    info = run_json(capsys, "info", "--preset", "tiny-smoe", "--json")
    assert info["mlp_strategy"].startswith("topk(k=") and info["active_params"] < info["non_embedding_params"]


def test_k_or_threshold_without_a_strategy_is_an_error(tiny_checkpoint, docs_file, capsys):
    code = main(["eval", "--checkpoint", str(tiny_checkpoint), "--text", str(docs_file), "--k", "2"])
    assert code == 2 and "--k needs --strategy" in capsys.readouterr().err


@pytest.mark.parametrize("att_flags", [[], ["--att-strategy", "threshold", "--att-threshold", "1.0"]])
def test_eval_and_sweep_mean_the_same_by_a_setting_and_report_the_same_figures(
    tiny_checkpoint, docs_file, tmp_path, capsys, att_flags
):
    """One meaning for a sparse flag and one definition of each figure: eval's --strategy threshold (attention as
    trained, or thresholded too) is the sweep's threshold point (without or with --att-same), figure for figure."""
    text = ["--checkpoint", str(tiny_checkpoint), "--text", str(docs_file), "--max-docs", "4"]
    evaluated = run_json(
        capsys, "eval", *text, "--strategy", "threshold", "--threshold", "1.0", *att_flags, "--json"
    )
    out = tmp_path / "sweep"
    same = ["--att-same"] if att_flags else []
    argv = ["sweep", *text, "--strategies", "threshold", "--thresholds", "1.0", *same, "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    point = next(
        p for p in json.loads((out / "sweep.json").read_text())["points"] if p["strategy"] == "threshold"
    )
    for figure in ("bits_per_byte", "token_perplexity", "active_params", "active_share", "active_hidden"):
        assert point[figure] == pytest.approx(evaluated[figure], rel=1e-9), figure
    assert point["active_share"] == pytest.approx(
        evaluated["active_params"] / evaluated["non_embedding_params"]
    )
    assert evaluated["att_strategy"] == ("threshold(eps=1.0)" if att_flags else "trained")


def test_eval_leads_with_bits_per_byte_and_names_each_figure(tiny_checkpoint, docs_file, capsys):
    assert (
        main(["eval", "--checkpoint", str(tiny_checkpoint), "--text", str(docs_file), "--max-docs", "2"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    figures = [
        line.split()[0] for line in lines[1:] if line.startswith("  ") and not line.startswith("  att ")
    ]
    assert figures[:3] == ["bits", "token", "word"]
    assert "active share 100.0%; active hidden 100.0% of expert units" in lines[-1]
