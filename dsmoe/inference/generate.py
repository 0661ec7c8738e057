"""Autoregressive generation: one prefill, then one token per step through the shared KV cache."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dsmoe.model.transformer import Transformer


def sample_next(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Greedy when temperature == 0, else temperature sampling restricted to the top-p nucleus."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = (
            sorted_p.cumsum(dim=-1) - sorted_p > top_p
        )  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_BT: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    prompt_mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue each prompt by up to ``max_new_tokens``; returns prompt + generated ids. Prompts of different lengths
    are left-padded, with ``prompt_mask_BT`` False on the padding; each then continues exactly as it would alone.
    Runs under whatever sparse setting the model has (see ``dsmoe.sparsify``). Sequences that emit ``eos_token_id``
    are padded with it until all have finished."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    b, t = prompt_BT.shape
    total = t + max_new_tokens
    cache = model.new_cache(b, total)
    out = torch.empty(b, total, dtype=prompt_BT.dtype, device=prompt_BT.device)
    out[:, :t] = prompt_BT
    done = torch.zeros(b, dtype=torch.bool, device=prompt_BT.device)
    padded = {}
    if prompt_mask_BT is not None:
        key_mask = torch.ones(b, total, dtype=torch.bool, device=prompt_BT.device)
        key_mask[:, :t] = prompt_mask_BT
        padded = {"key_mask_BS": key_mask[:, :t]}
    logits = model(prompt_BT, cache=cache, last_only=True, **padded).logits[:, -1]
    for pos in range(t, total):
        token = sample_next(logits, temperature, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        out[:, pos] = token
        if pos + 1 == total or (eos_token_id is not None and bool(done.all())):
            return out[:, : pos + 1]
        if padded:
            padded["key_mask_BS"] = key_mask[:, : pos + 1]
        logits = model(token[:, None], cache=cache, start_pos=pos, last_only=True, **padded).logits[:, -1]
    return out


@torch.inference_mode()
def stream(
    model: Transformer,
    prompt_T: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """One prompt's continuation, one token id at a time as it is chosen: what ``generate`` gives a batch of one,
    for callers that pass tokens on as they come (``dsmoe serve``). Stops after ``max_new_tokens`` or after
    yielding ``eos_token_id``."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    t = prompt_T.shape[0]
    cache = model.new_cache(1, t + max_new_tokens)
    logits = model(prompt_T[None], cache=cache, last_only=True).logits[:, -1]
    for pos in range(t, t + max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        yield int(token)
        if int(token) == eos_token_id or pos + 1 == t + max_new_tokens:
            return
        logits = model(token[:, None], cache=cache, start_pos=pos, last_only=True).logits[:, -1]
