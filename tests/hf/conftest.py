import pytest
from hf_fixtures import make_checkpoint

from dsmoe.cli import main

EXPORT_SPARSE = ["--strategy", "topk", "--k", "3"]  # stored in config.json; native comparisons use the same


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(checkpoint folder, exported Hugging Face folder) of one tiny random DS-MoE model with a real tokenizer."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(root)
    out = root / "hf-model"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *EXPORT_SPARSE]) == 0
    return checkpoint, out
