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


@pytest.fixture(scope="session")
def tiny_trained_checkpoint(tmp_path_factory):
    """A tiny DS-MoE trained for 150 steps on the synthetic corpus (about 10 s on one core), with the MI loss, so
    its routers prefer some experts and sparse settings trade perplexity for active parameters as in a real
    model. 3 layers, so per-layer settings have room to differ."""
    root = tmp_path_factory.mktemp("ckpt-trained")
    docs = synthetic_corpus(n_docs=200, seed=3)
    tokenizer = train_bpe(docs, VOCAB)
    tok_file = save_tokenizer(tokenizer, root / "tok")
    torch.manual_seed(0)
    cfg = small_config("dsmoe", vocab_size=VOCAB, max_seq_len=48, n_layers=3)
    model = Transformer(cfg)
    stream = torch.tensor([i for d in docs for i in tokenizer.encode(d).ids])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(stream) - 49, (16,), generator=gen)
        batch = torch.stack([stream[s : s + 49] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return write_checkpoint(root / "trained", model.state_dict(), cfg, tokenizer_file=tok_file)
