"""Batched scoring and rolling perplexity against plain per-sequence computations."""

import math

import pytest
import torch
from helpers import small_config

from dsmoe.evaluation.perplexity import (
    count_words,
    loglikelihood_rolling,
    perplexity,
    rolling_loglikelihoods,
    rolling_windows,
)
from dsmoe.evaluation.scoring import score_positions, score_requests
from dsmoe.inference.meter import ActiveMeter
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer

SETTINGS = {
    "dense": (None, None),
    "topk": (SparseSetting("topk", k=2), SparseSetting("topk", k=3)),
    "threshold": (SparseSetting("threshold", threshold=0.9), SparseSetting("threshold", threshold=1.1)),
}


@pytest.fixture
def model():
    return Transformer(small_config("dsmoe", max_seq_len=40)).eval()


def random_requests(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, 41, (1,), generator=g))
        ids = torch.randint(0, 97, (length,), generator=g).tolist()
        out.append((ids, int(torch.randint(1, length, (1,), generator=g))))
    return out


def direct(model, ids, n_scored, plan=None):
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]]), plan=plan).logits[0].double(), -1)
    positions = range(len(ids) - 1 - n_scored, len(ids) - 1)
    total = sum(float(logprobs[p, ids[p + 1]]) for p in positions)
    greedy = all(int(logprobs[p].argmax()) == ids[p + 1] for p in positions)
    return total, greedy


@pytest.mark.parametrize("name", SETTINGS)
def test_batched_scores_equal_one_sequence_at_a_time(model, name):
    plan = SparsePlan.build(model.cfg, *SETTINGS[name])
    requests = random_requests(11)
    batched = score_requests(model, requests, batch_size=4, plan=plan)
    single = score_requests(model, requests, batch_size=1, plan=plan)
    for (ids, n), b, s in zip(requests, batched, single, strict=True):
        expected, greedy = direct(model, ids, n, plan)
        assert b.logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert s.logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert b.is_greedy == s.is_greedy == greedy


def test_only_scored_positions_get_logits_a_chunk_at_a_time(model, monkeypatch):
    requests = random_requests(9, seed=4)
    expected = score_requests(model, requests, batch_size=3)
    rows = []
    head = model.head
    monkeypatch.setattr(model, "head", lambda x: rows.append(x.shape[0]) or head(x))
    assert score_requests(model, requests, batch_size=3) == expected
    assert sum(rows) == sum(n for _, n in requests) and max(rows) <= 256  # never the [B, T, V] batch
    x, _ = model.hidden(torch.tensor([requests[0][0]]))
    target = torch.tensor(requests[0][0][1:])
    whole, chunked = (
        score_positions(model, x[0, :-1], target),
        score_positions(model, x[0, :-1], target, chunk=3),
    )
    assert float(chunked[0].sum()) == pytest.approx(float(whole[0].sum()), rel=1e-7)
    assert torch.equal(chunked[1], whole[1])


def test_padding_is_not_metered(model):
    setting = SparseSetting("threshold", threshold=1.0)
    requests = random_requests(9, seed=3)
    counts = []
    for batch_size in (1, 5):
        meter = ActiveMeter(model.cfg)
        plan = SparsePlan.build(model.cfg, setting, setting)
        score_requests(model, requests, batch_size=batch_size, plan=plan, meter=meter)
        counts.append((meter.tokens, meter.active))
    assert counts[0] == counts[1]
    assert counts[0][0]["mlp"][0] == sum(len(ids) - 1 for ids, _ in requests)


def test_rejects_impossible_requests(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        score_requests(model, [(list(range(42)), 1)])
    with pytest.raises(ValueError, match="n_scored"):
        score_requests(model, [([1, 2, 3], 3)])


@pytest.mark.parametrize("max_len", [1, 5, 16])
def test_rolling_windows_match_lm_eval(max_len):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in range(1, 60):
        tokens = list(range(100, 100 + n))
        ours = list(rolling_windows(tokens, 7, max_len))
        # lm-eval scores (context, continuation) as: input (context + continuation)[:-1], last len(continuation)
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, max_len, 1)]
        assert [(list(a) + list(b), len(b)) for a, b in theirs] == ours
        assert sum(k for _, k in ours) == n
        assert all(len(ids) - 1 <= max_len for ids, _ in ours)


def test_rolling_loglikelihood_is_the_sum_over_windows(model):
    tokens = torch.randint(0, 97, (95,)).tolist()
    expected = sum(direct(model, ids, k)[0] for ids, k in rolling_windows(tokens, 0, 40))
    assert loglikelihood_rolling(model, tokens, 0, 40) == pytest.approx(expected, rel=1e-6)


def test_perplexity_batched_equals_unbatched(tiny_checkpoint, eval_docs):
    from dsmoe.data.tokenizer import eos_id
    from dsmoe.training.checkpoint import load_pretrained

    model, tok = load_pretrained(tiny_checkpoint)
    eos = eos_id(tok)
    one = perplexity(model, tok, eval_docs, 48, eos, batch_size=1)
    many = perplexity(model, tok, eval_docs, 48, eos, batch_size=7)
    for key in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert many[key] == pytest.approx(one[key], rel=1e-6)
    per_doc = [loglikelihood_rolling(model, tok.encode(d).ids, eos, 48) for d in eval_docs]
    assert rolling_loglikelihoods(
        model, [tok.encode(d).ids for d in eval_docs], eos, 48, batch_size=6
    ) == pytest.approx(per_doc, rel=1e-6)
    assert one["word_perplexity"] == pytest.approx(math.exp(-sum(per_doc) / sum(map(count_words, eval_docs))))
    assert one["bits_per_byte"] == pytest.approx(
        -sum(per_doc) / sum(len(d.encode()) for d in eval_docs) / math.log(2)
    )


def test_count_words_follows_lm_eval():
    assert count_words("a b  c") == 3
    assert count_words(" a b\n") == 4  # re.split keeps the empty pieces at both ends, as lm-eval counts them
