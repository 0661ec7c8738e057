import os

import pytest
import torch

# Triton kernels can only run on a CPU through Triton's interpreter, and Triton reads this flag when a kernel is
# defined (at import of dsmoe.kernels), so it is set before any test imports dsmoe.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def int8_on_this_cpu(monkeypatch):
    """int8 applied whatever this CPU is (prepare applies it only where it pays: AVX-512), for the tests of what
    int8 computes; tests/test_quantize.py tests that choice itself on both kinds of CPU."""
    from dsmoe.inference import quantize

    monkeypatch.setattr(quantize, "INT8_CPU_CAPABILITIES", (torch.backends.cpu.get_cpu_capability(),))
