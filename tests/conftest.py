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
