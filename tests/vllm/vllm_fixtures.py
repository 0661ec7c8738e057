"""Exported folders, dsmoe's own greedy tokens for them, and vLLM engines over them (tests/vllm)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path

import torch
from helpers import small_config, synthetic_corpus

from dsmoe.data.tokenizer import save_tokenizer, train_bpe
from dsmoe.hf.export import export
from dsmoe.inference.generate import generate
from dsmoe.model.plan import SparsePlan
from dsmoe.model.transformer import Transformer
from dsmoe.training.checkpoint import load_pretrained, write_checkpoint

VOCAB = 384
MAX_LEN = 64
MAX_NEW = 12
# Token ids of different lengths, so that vLLM schedules prefill chunks of several sizes together.
PROMPTS = [[5, 17, 42], [100, 7, 250, 31, 9, 64, 12, 300, 2, 77, 150], [8], [201, 33, 61, 5, 90, 120, 7]]

_checkpoints: dict[str, Path] = {}


def checkpoint_for(tmp_path_factory, regime: str) -> Path:
    """One random checkpoint per regime, with a trained BPE tokenizer; vLLM's CPU attention needs head_dim >= 32.
    A larger init spreads the logits, so greedy choices are not near-ties that rounding could flip. The SMoE has
    the paper's GeLU and LayerNorm, the others Llama's SwiGLU and RMSNorm (each runs through its own vLLM ops)."""
    if regime not in _checkpoints:
        root = tmp_path_factory.mktemp(f"vllm-{regime}")
        torch.manual_seed(0)
        tokenizer = save_tokenizer(train_bpe(synthetic_corpus(), VOCAB), root / "tokenizer")
        cfg = small_config(
            regime,
            vocab_size=VOCAB,
            d_model=64,
            head_dim=32,
            activation="gelu" if regime == "smoe" else "swiglu",
            norm="layernorm" if regime == "smoe" else "rmsnorm",
            max_seq_len=MAX_LEN,
            init_std=0.1,
            # DS-MoE's SwiGLU experts 32 wide: under top-k they run through vLLM's CPU fused MoE
            **({"d_expert": 32} if regime == "dsmoe" else {}),
        )
        _checkpoints[regime] = write_checkpoint(
            root / "checkpoint", Transformer(cfg).state_dict(), cfg, tokenizer_file=tokenizer
        )
    return _checkpoints[regime]


def export_folder(tmp_path_factory, regime: str, att=None, mlp=None) -> tuple[Path, Path]:
    """(checkpoint, exported folder) with ``att`` / ``mlp`` settings (one, one per layer, or None) in config.json."""
    checkpoint = checkpoint_for(tmp_path_factory, regime)
    out = tmp_path_factory.mktemp(f"export-{regime}")
    return checkpoint, export(checkpoint, out, att=att, mlp=mlp, overwrite=True)


def native_tokens(checkpoint: Path, prompts: list[list[int]], att=None, mlp=None) -> list[list[int]]:
    """dsmoe's own greedy continuation of each prompt alone (no batching, no padding)."""
    model, _ = load_pretrained(checkpoint)
    plan = SparsePlan.build(model.cfg, att=att, mlp=mlp)
    return [generate(model, torch.tensor([p]), MAX_NEW, plan=plan)[0, len(p) :].tolist() for p in prompts]


@contextlib.contextmanager
def vllm_engine(folder: Path, dtype: str | None = "float32", **kwargs) -> Iterator:
    """An offline vLLM engine over ``folder`` in fp32 (``dtype=None``: vLLM's default, as the README writes it), small
    enough for a 2-core CI machine; shut down on exit."""
    from vllm import LLM

    llm = LLM(
        model=str(folder),
        **({} if dtype is None else {"dtype": dtype}),
        trust_remote_code=True,
        max_model_len=MAX_LEN,
        max_num_seqs=8,
        gpu_memory_utilization=0.05,
        seed=0,
        **kwargs,
    )
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
