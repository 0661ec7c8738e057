"""tools/gpu_paper.py (the paper's GPU tables, issue #32) on a machine without a GPU: its dry run takes every part's
code path at tiny shapes on the CPU and writes JSON of the structure the GPU run writes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsmoe.bench.paper import peak_flops, training_flops_per_token
from dsmoe.config import preset

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_paper.py"
MEASURES = {"input_tps", "latency_s", "output_tps_b2"}  # the dry run decodes at batch 2 only


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("paper")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--python", sys.executable, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


def test_the_dry_run_passes_every_part_and_writes_its_summary(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr + (out / "paper.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["gpu"] is None
    assert list(summary["parts"]) == ["infer-3b", "infer-6b", "train-1b"]
    assert all(part["status"] == "PASS" for part in summary["parts"].values())
    assert proc.stdout.splitlines()[-1].startswith("gpu-paper: 3 of 3 parts passed")


@pytest.mark.parametrize("size, top_k", [("3b", 6), ("6b", 4)])
def test_each_inference_part_measures_dense_ds_moe_and_the_llama_peer(dry_run, size, top_k):
    result = json.loads((dry_run[1] / f"infer-{size}.json").read_text())
    assert result["complete"] and result["dry_run"]
    assert set(result["models"]) == {"dense", "ds-moe", "hf-llama"}
    for name, row in result["models"].items():
        assert set(row) == MEASURES, name
        assert all(value > 0 for value in row.values()), name
    assert result["sparse_settings"] == {"dense": "dense", "ds-moe": f"topk(k={top_k})"}
    assert result["peer"]["class"] == "LlamaForCausalLM"
    assert result["peer"]["param_check"]["only_in_peer"] == {}  # the same network as our Dense
    assert set(result["ratios_to_dense"]["ds-moe"]) == MEASURES
    assert result["ratios_to_dense"]["dense"] == {m: 1.0 for m in MEASURES}
    assert set(result["dense_over_peer"]) == MEASURES
    latency = result["latency_batch"]
    assert latency["ran"] == latency["planned"] == latency["requested"] == 4 and latency["scaled"] is None
    assert result["input_batch"] == 4
    assert result["settings"]["shape"] == "llama" and result["settings"]["mlp_k"] == top_k


def test_the_training_part_plans_its_micro_batch_and_counts_flops(dry_run):
    result = json.loads((dry_run[1] / "train-1b.json").read_text())
    assert result["complete"] and list(result["models"]) == ["dense-1b", "ds-moe-1b"]
    assert result["gpu"] is None and result["peak_bf16_flops"] is None
    for name, row in result["models"].items():
        assert row["plan"]["micro_batch"] >= 1 and row["plan"]["traced_peak_gib"] <= row["plan"]["budget_gib"]
        assert row["tokens_per_s"] > 0 and row["mfu"] is None, name  # no peak FLOP/s for a CPU
        assert len(row["step_seconds"]) == result["spec"]["steps"]
        assert all(loss == loss for loss in row["losses"])  # finite, not NaN
    assert set(result["tokens_per_s_over_first"]) == {"dense-1b", "ds-moe-1b"}


def test_training_flops_count_every_expert_and_the_attention_scores():
    dense, dsmoe = preset("dense-1b"), preset("ds-moe-1b")
    attention = 12 * 24 * 32 * 64 * 2048
    assert (
        training_flops_per_token(dense, 2048) == 6 * (dense.non_embedding_params + 51200 * 2048) + attention
    )
    # DS-MoE computes all 32 MLP experts and all 16 attention experts, which split Dense's widths: Dense's
    # products, plus its routers'
    routers = 24 * 2048 * (16 + 32)
    assert training_flops_per_token(dsmoe, 2048) - training_flops_per_token(dense, 2048) == 6 * routers


def test_peak_flops_by_gpu_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Other GPU") is None and peak_flops(None) is None


def test_an_unknown_part_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--parts", "infer-3b,infer-9b"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--parts: unknown infer-9b" in proc.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: runs the real tables")
def test_without_a_gpu_the_command_says_it_runs_dry(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--parts", "train-1b", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("gpu-paper: no CUDA GPU on this machine")
