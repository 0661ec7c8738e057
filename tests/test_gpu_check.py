"""tools/gpu_check.py (`make gpu-check`) on a machine without a GPU: it says so, its CPU self-check passes, exit 0."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None,
    reason="a GPU machine: gpu_check.py would build a CUDA venv and run the GPU checks (run make gpu-check)",
)
def test_gpu_check_without_a_gpu_runs_its_self_check_and_exits_0():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "gpu-check: no CUDA GPU on this machine; running the CPU self-check only"
    assert [line.split(":")[0] for line in lines if line.startswith("PASS")] == [
        "PASS self-check train-tiny",
        "PASS self-check train-1b-block",
    ]
    assert sum(line.startswith("SKIP") and "no CUDA GPU" in line for line in lines) == 4
