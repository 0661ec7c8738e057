"""Shared fixtures for the Hugging Face tests: a real checkpoint with a trained BPE tokenizer, exported once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import small_config, synthetic_corpus

from dsmoe.data.tokenizer import save_tokenizer, train_bpe
from dsmoe.model.transformer import Transformer
from dsmoe.training.checkpoint import write_checkpoint

VOCAB = 384


def make_checkpoint(root: Path, regime: str = "dsmoe", seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    tokenizer_file = save_tokenizer(train_bpe(synthetic_corpus(), VOCAB), root / "tokenizer")
    cfg = small_config(regime, vocab_size=VOCAB)
    return write_checkpoint(
        root / "checkpoint", Transformer(cfg).state_dict(), cfg, tokenizer_file=tokenizer_file
    )


def isolated_python(script: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that cannot import dsmoe: isolated mode (-I: no PYTHONPATH, no script
    folder on sys.path), a working folder outside the repository, and ``dsmoe`` blocked in sys.modules because the
    venv has it installed in editable mode."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_MODULES_CACHE=str(cwd / "hf_modules"),
        TOKENIZERS_PARALLELISM="false",
    )
    guard = (
        "import sys\nsys.modules['dsmoe'] = None\n"
        "try:\n    import dsmoe\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('dsmoe is importable in the isolated child')\n"
    )
    return subprocess.run(
        [sys.executable, "-I", "-c", guard + script],
        cwd=cwd,
        stdin=subprocess.DEVNULL,  # a question transformers asks (custom code? [y/N]) is answered by end-of-file
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
