"""A tiny DS-MoE checkpoint with a real BPE tokenizer, shared by the evaluation tests."""

import json

import pytest
import torch
from helpers import small_config, synthetic_corpus

from dsmoe.data.tokenizer import save_tokenizer, train_bpe
from dsmoe.model.transformer import Transformer
from dsmoe.training.checkpoint import write_checkpoint

VOCAB = 300


def _checkpoint(tmp_path_factory, regime):
    root = tmp_path_factory.mktemp(f"ckpt-{regime}")
    tokenizer = train_bpe(synthetic_corpus(), VOCAB)
    assert tokenizer.get_vocab_size() <= VOCAB
    tok_file = save_tokenizer(tokenizer, root / "tok")
    torch.manual_seed(1)
    cfg = small_config(regime, vocab_size=VOCAB, max_seq_len=48)
    return write_checkpoint(root / "tiny", Transformer(cfg).state_dict(), cfg, tokenizer_file=tok_file)


@pytest.fixture(scope="session")
def tiny_smoe_checkpoint(tmp_path_factory):
    """An SMoE (top-2 of 8 MLP experts) to check that every entry point runs it as trained."""
    return _checkpoint(tmp_path_factory, "smoe")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Untrained weights are enough here: every check compares two computations of the same model. The BPE has
    fewer ids than VOCAB, so the embedding covers every token id."""
    return _checkpoint(tmp_path_factory, "dsmoe")


@pytest.fixture(scope="session")
def eval_docs():
    """Held-out-style documents of different lengths, several longer than one 48-token window."""
    docs = synthetic_corpus(n_docs=12, seed=7)
    return [d[: 40 + 37 * i] for i, d in enumerate(docs)]


@pytest.fixture(scope="session")
def docs_file(tmp_path_factory, eval_docs):
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in eval_docs))
    return path
