"""`dsmoe bench`: the models are Table 6's, the JSON carries every figure and ratios from the same run."""

import json

import pytest

from dsmoe.bench.models import bench_models
from dsmoe.bench.throughput import BenchSettings, run_benchmark
from dsmoe.cli import main
from dsmoe.config import ConfigError, preset

TINY = dict(
    d_model=64,
    n_layers=1,
    vocab_size=64,
    input_len=8,
    max_input_batch=2,
    decode_tokens=3,
    decode_prompt=2,
    decode_batches=(1, 16),
    latency_batch=2,
    latency_prompt=4,
    latency_new=2,
    mlp_tokens=16,
    repeats=1,
)


@pytest.mark.parametrize("size", ["10b", "14b", "19b"])
def test_bench_models_at_paper_scale_are_table_6(size):
    """At the paper's width and depth the benchmark's three models are the Table 6 presets."""
    d_model = {"10b": 5120, "14b": 6144, "19b": 7168}[size]
    smoe = {"10b": "smoe-17b", "14b": "smoe-25b", "19b": "smoe-34b"}[size]
    models = {m.name: m for m in bench_models(d_model, 36, 51200, 2048)}
    for name, preset_name in (("dense", f"dense-{size}"), ("smoe", smoe), ("ds-moe", f"ds-moe-{size}")):
        expected = preset(preset_name)
        assert models[name].cfg.non_embedding_params == expected.non_embedding_params, name
    assert models["ds-moe"].mlp.k == 4 and models["smoe"].cfg.smoe_top_k == 2


def test_run_benchmark_reports_every_figure_and_ratios_to_dense():
    result = run_benchmark(BenchSettings(**TINY))
    assert set(result["models"]) == {"dense", "smoe", "ds-moe"}
    for name, figures in result["models"].items():
        for key in (
            "input_tps",
            "output_tps_b1",
            "output_tps_b16",
            "latency_s",
            "active_params",
            "total_params",
        ):
            assert figures[key] > 0, (name, key)
            assert result["ratios"][name][key] == pytest.approx(figures[key] / result["models"]["dense"][key])
    dense, dsmoe = result["models"]["dense"], result["models"]["ds-moe"]
    assert dense["active_params"] == dense["total_params"]
    assert dsmoe["active_params"] < 0.5 * dsmoe["total_params"]  # 4 of 32 MLP experts
    assert result["models"]["smoe"]["total_params"] > 1.5 * dense["total_params"]  # twice the MLP
    assert set(result["mlp_flops"]) == {
        "dense/dense",
        "smoe/sparse-fast",
        "smoe/sparse-reference",
        "ds-moe/sparse-fast",
        "ds-moe/sparse-reference",
    }
    assert result["mlp_flops"]["ds-moe/sparse-fast"]["gflop"] == pytest.approx(
        result["mlp_flops"]["dense/dense"]["gflop"] * 4 / 32
    )


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "b" / "result.json"
    args = [
        "bench",
        "--json",
        "--out",
        str(out),
        "--d-model",
        "64",
        "--n-layers",
        "1",
        "--vocab-size",
        "64",
        "--input-len",
        "8",
        "--max-input-batch",
        "1",
        "--decode-tokens",
        "2",
        "--decode-batches",
        "1",
        "2",
        "--latency-batch",
        "1",
        "--latency-prompt",
        "4",
        "--latency-new",
        "1",
        "--mlp-tokens",
        "8",
        "--repeats",
        "1",
    ]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert "output_tps_b2" in printed["models"]["ds-moe"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left behind


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(dtype="fp8"), "unknown dtype"),
        (dict(d_model=100), "multiple of 64"),
        (dict(mlp_k=33), "--mlp-k"),
        (dict(repeats=0), "repeats"),
        (dict(memory_gb=1e-6), "--memory-gb"),
    ],
)
def test_bench_rejects_bad_settings(bad, message):
    with pytest.raises(ConfigError, match=message):
        run_benchmark(BenchSettings(**{**TINY, **bad}))


def test_bench_cli_error_exit_code(capsys):
    assert main(["bench", "--d-model", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
