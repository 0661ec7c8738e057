"""A tiny DS-MoE checkpoint with a real BPE tokenizer, shared by the evaluation tests."""

import json

import pytest
import torch
from helpers import small_config, synthetic_corpus

from dsmoe.data.tokenizer import save_tokenizer, train_bpe
from dsmoe.model.transformer import Transformer
from dsmoe.training.checkpoint import write_checkpoint

VOCAB = 300


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Untrained weights are enough here: every check compares two computations of the same model. The BPE has
    fewer ids than VOCAB, so the embedding covers every token id."""
    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = train_bpe(synthetic_corpus(), VOCAB)
    assert tokenizer.get_vocab_size() <= VOCAB
    tok_file = save_tokenizer(tokenizer, root / "tok")
    torch.manual_seed(1)
    cfg = small_config("dsmoe", vocab_size=VOCAB, max_seq_len=48)
    model = Transformer(cfg)
    return write_checkpoint(root / "tiny", model.state_dict(), cfg, tokenizer_file=tok_file)


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
