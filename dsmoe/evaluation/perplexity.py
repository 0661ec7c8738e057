"""Document-level perplexity the way lm-evaluation-harness computes Wikitext's: rolling log-likelihood windows over
each document (the first window starts from the end-of-text token), summed, then normalised per token, per word and
per byte. The windows of many documents are scored together in padded batches (see ``scoring.py``)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from dsmoe.evaluation.scoring import Request, score_requests

if TYPE_CHECKING:
    from dsmoe.inference.meter import ActiveMeter
    from dsmoe.model.plan import SparsePlan
    from dsmoe.model.transformer import Transformer


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> Iterator[tuple[list[int], int]]:
    """(ids, number of trailing tokens to score) windows that score every token of ``tokens`` once.

    Each window predicts up to ``max_len`` new tokens; its input is the ``max_len`` tokens just before them (the
    stream starts with ``prefix_token``), so later windows see the most context that fits, as lm-eval's
    ``get_rolling_token_windows`` with context_len=1 gives.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    stream = [prefix_token] + tokens
    scored = 0
    while scored < len(tokens):
        n_new = min(max_len, len(tokens) - scored)
        end = scored + n_new  # predicting stream[scored+1 : end+1] from inputs ending at stream[end-1]
        start = max(0, end - max_len)
        yield stream[start : end + 1], n_new
        scored = end


def rolling_loglikelihoods(
    model: Transformer,
    documents_tokens: list[list[int]],
    prefix_token: int,
    max_len: int,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    progress: bool = False,
    plan: SparsePlan | None = None,
    meter: ActiveMeter | None = None,
) -> list[float]:
    """Sum of log p(token | preceding tokens) over each document; all documents' windows share the batches. ``plan``
    and ``meter``: as for ``score_requests``."""
    requests: list[Request] = []
    owner: list[int] = []
    for doc, tokens in enumerate(documents_tokens):
        for window in rolling_windows(tokens, prefix_token, max_len):
            requests.append(window)
            owner.append(doc)
    scores = score_requests(
        model, requests, batch_size, device, prefix_token, progress=progress, plan=plan, meter=meter
    )
    totals = [0.0] * len(documents_tokens)
    for doc, score in zip(owner, scores, strict=True):
        totals[doc] += score.logprob
    return totals


def loglikelihood_rolling(
    model: Transformer,
    tokens: list[int],
    prefix_token: int,
    max_len: int,
    device: torch.device | str | None = None,
) -> float:
    """Sum of log p(token | preceding tokens) over one document, one window per forward pass."""
    return rolling_loglikelihoods(model, [tokens], prefix_token, max_len, batch_size=1, device=device)[0]


def count_words(text: str) -> int:
    """lm-eval's word count for rolling-loglikelihood tasks: pieces between runs of whitespace (a leading or
    trailing run adds an empty piece, as it does there)."""
    return len(re.split(r"\s+", text))


def perplexity_from_totals(loglik: float, n_tokens: int, n_words: int, n_bytes: int) -> dict[str, float]:
    """lm-eval's aggregation: exp(-loglik / count) per token, word and byte, and bits per byte."""
    if n_tokens == 0:
        raise ValueError("no tokens to evaluate: the documents are empty")
    return {
        "token_perplexity": math.exp(-loglik / n_tokens),
        "word_perplexity": math.exp(-loglik / n_words),
        "byte_perplexity": math.exp(-loglik / n_bytes),
        "bits_per_byte": -loglik / n_bytes / math.log(2),
        "tokens": n_tokens,
        "words": n_words,
        "bytes": n_bytes,
        "loglikelihood": loglik,
    }


def perplexity(
    model: Transformer,
    tokenizer,
    documents: Iterable[str],
    max_len: int,
    prefix_token: int,
    device: torch.device | str | None = None,
    progress: bool = False,
    batch_size: int = 16,
    plan: SparsePlan | None = None,
    meter: ActiveMeter | None = None,
) -> dict[str, float]:
    """Word, byte and token perplexity and bits per byte over ``documents`` (each a string), under ``plan`` (None: as
    trained), the active experts counted into ``meter``. Documents that tokenize to nothing are skipped (they have
    no token to score)."""
    encoded = [(doc, tokenizer.encode(doc).ids) for doc in documents]
    docs = [doc for doc, ids in encoded if ids]
    tokens = [ids for _, ids in encoded if ids]
    totals = rolling_loglikelihoods(
        model, tokens, prefix_token, max_len, batch_size, device, progress, plan=plan, meter=meter
    )
    n_words = sum(count_words(doc) for doc in docs)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    return perplexity_from_totals(sum(totals), sum(len(t) for t in tokens), n_words, n_bytes)
