"""Batched scoring of token sequences: the one forward-pass loop behind perplexity, lm-eval's loglikelihood and
loglikelihood_rolling.

A request is ``(ids, n_scored)``: the model reads ``ids[:-1]`` and the log-probabilities of the last ``n_scored``
tokens of ``ids`` are summed. Requests are sorted by length (longest first, so the first batch shows the peak memory),
right-padded into batches and run with a token mask, so padding neither changes the real tokens' logits (attention is
causal) nor counts in an ActiveMeter. Results come back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dsmoe.inference.meter import ActiveMeter
    from dsmoe.model.plan import SparsePlan
    from dsmoe.model.transformer import Transformer

Request = tuple[Sequence[int], int]


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(token | everything before it) over the scored tokens
    is_greedy: bool  # every scored token is the argmax of its distribution


def check_requests(requests: Sequence[Request], max_len: int) -> None:
    for i, (ids, n_scored) in enumerate(requests):
        if len(ids) < 2 or not 1 <= n_scored <= len(ids) - 1:
            raise ValueError(
                f"request {i}: need at least one input token and 1 <= n_scored < len(ids), "
                f"got {len(ids)} ids and n_scored={n_scored}"
            )
        if len(ids) - 1 > max_len:
            raise ValueError(
                f"request {i}: {len(ids) - 1} input tokens exceed the model's max_seq_len={max_len}; "
                "truncate the context from the left first"
            )


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the requests grouped into batches of at most ``batch_size``, longest requests first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def score_positions(
    model: Transformer, hidden_PD: torch.Tensor, target_P: torch.Tensor, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the log-probability [P] (float64) of ``target_P`` after each hidden state and whether it is the
    argmax [P], through the LM head ``chunk`` positions at a time: only scored positions get logits, never the
    whole [B, T, V] batch (13 GB at 16 x 2048 x 51200 in fp32)."""
    logprob_P, greedy_P = [], []
    for start in range(0, len(target_P), chunk):
        logprobs = torch.log_softmax(model.head(hidden_PD[start : start + chunk]).float(), dim=-1)
        target = target_P[start : start + chunk]
        logprob_P.append(logprobs.gather(-1, target[:, None])[:, 0].double())
        greedy_P.append(logprobs.argmax(-1) == target)
    return torch.cat(logprob_P), torch.cat(greedy_P)


@torch.no_grad()
def score_requests(
    model: Transformer,
    requests: Sequence[Request],
    batch_size: int = 16,
    device: torch.device | str | None = None,
    pad_id: int = 0,
    progress: bool = False,
    plan: SparsePlan | None = None,
    meter: ActiveMeter | None = None,
) -> list[Score]:
    """Score every request (see the module docstring); ``batch_size`` sequences per forward pass, under ``plan``
    (None: as trained), each forward's router records added to ``meter`` when one is given."""
    from tqdm import tqdm

    device = device or next(model.parameters()).device
    check_requests(requests, model.cfg.max_seq_len)
    results: list[Score | None] = [None] * len(requests)
    batches = batches_by_length([len(ids) for ids, _ in requests], batch_size)
    # leave=False: under a sweep's or tune's bar of settings, this bar is the current setting's, then goes
    for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress, leave=False):
        width = len(requests[batch[0]][0]) - 1
        inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
        real = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, i in enumerate(batch):
            ids = requests[i][0]
            inputs[row, : len(ids) - 1] = torch.as_tensor(ids[:-1])
            real[row, : len(ids) - 1] = True
        hidden_BTD, routers = model.hidden(inputs.to(device), plan=plan, token_mask_BT=real.to(device))
        if meter is not None:
            meter.update(routers)
        # every request's scored positions of the batch at once: positions [end - n, end) predict its last n tokens
        counts = [requests[i][1] for i in batch]
        hidden_PD = torch.cat(
            [
                hidden_BTD[row, len(requests[i][0]) - 1 - n : len(requests[i][0]) - 1]
                for row, (i, n) in enumerate(zip(batch, counts, strict=True))
            ]
        )
        target_P = torch.tensor(
            [t for i, n in zip(batch, counts, strict=True) for t in requests[i][0][-n:]],
            device=hidden_BTD.device,
        )
        logprob_P, greedy_P = score_positions(model, hidden_PD, target_P)
        for i, lp, greedy in zip(batch, logprob_P.split(counts), greedy_P.split(counts), strict=True):
            results[i] = Score(logprob=float(lp.sum()), is_greedy=bool(greedy.all()))
    return results  # type: ignore[return-value]
