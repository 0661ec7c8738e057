"""Document-level perplexity the way lm-evaluation-harness computes Wikitext's: rolling log-likelihood windows over
each document (the first window starts from the end-of-text token), summed, then normalised per token, per word and
per byte. Active parameters are measured over the same tokens."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> Iterator[tuple[list[int], int]]:
    """(input ids, number of trailing positions to score) windows that score every token of ``tokens`` once.

    Each window predicts up to ``max_len`` new tokens; its input is the ``max_len`` tokens just before them (the
    stream starts with ``prefix_token``), so later windows see the most context that fits, as lm-eval's
    ``get_rolling_token_windows`` with context_len=1 gives.
    """
    stream = [prefix_token] + tokens
    scored = 0
    while scored < len(tokens):
        n_new = min(max_len, len(tokens) - scored)
        end = scored + n_new  # predicting stream[scored+1 : end+1] from inputs ending at stream[end-1]
        start = max(0, end - max_len)
        yield stream[start:end + 1], n_new
        scored = end


@torch.no_grad()
def loglikelihood_rolling(model: nn.Module, tokens: list[int], prefix_token: int, max_len: int,
                          device: torch.device | str = "cpu") -> float:
    """Sum of log p(token | preceding tokens) over a whole document."""
    total = 0.0
    for window, n_new in rolling_windows(tokens, prefix_token, max_len):
        ids = torch.tensor(window, device=device)[None]
        logits = model(ids[:, :-1]).logits[0, -n_new:].float()
        total += float(-F.cross_entropy(logits, ids[0, -n_new:], reduction="sum"))
    return total


def perplexity(model: nn.Module, tokenizer, documents: Iterable[str], max_len: int, prefix_token: int,
               device: torch.device | str = "cpu", progress: bool = False) -> dict[str, float]:
    """Word, byte and token perplexity and bits per byte over ``documents`` (each a string)."""
    from tqdm import tqdm

    loglik, n_tokens, n_words, n_bytes = 0.0, 0, 0, 0
    docs = list(documents)
    for doc in tqdm(docs, desc="perplexity", disable=not progress):
        ids = tokenizer.encode(doc).ids
        if not ids:
            continue
        loglik += loglikelihood_rolling(model, ids, prefix_token, max_len, device)
        n_tokens += len(ids)
        n_words += len(doc.split())  # lm-eval's wikitext word count: whitespace-separated words
        n_bytes += len(doc.encode("utf-8"))
    if n_tokens == 0:
        raise ValueError("no tokens to evaluate: the documents are empty")
    return {"token_perplexity": math.exp(-loglik / n_tokens), "word_perplexity": math.exp(-loglik / n_words),
            "byte_perplexity": math.exp(-loglik / n_bytes), "bits_per_byte": -loglik / n_bytes / math.log(2),
            "tokens": n_tokens, "words": n_words, "bytes": n_bytes, "loglikelihood": loglik}
