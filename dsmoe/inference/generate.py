"""Autoregressive generation: one prefill, then one token per step through the shared KV cache, eager or as one
compiled graph per step (``Decoder``)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from dsmoe.inference.meter import ActiveMeter, router_counts
from dsmoe.model.attention import KVCache
from dsmoe.model.plan import SparsePlan, trained_plan
from dsmoe.model.transformer import Transformer

# Graphs one process may keep for the decode step (torch's default of 8 counts every model, sparse setting, batch
# size and cache length together, and past it dynamo falls back to eager with a warning).
COMPILED_GRAPHS = 64


def _decode_step(
    model: Transformer,
    token_B1: torch.Tensor,
    pos: torch.Tensor,
    key_mask_BS: torch.Tensor,
    cache: KVCache,
    plan: SparsePlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, V] of one decode step, and the experts each token used per router record [2 * n_layers, B]."""
    out = model(token_B1, plan=plan, cache=cache, start_pos=pos, last_only=True, key_mask_BS=key_mask_BS)
    return out.logits[:, -1], router_counts(out.routers, token_B1.device)


@functools.cache
def _compiled_decode_step(cuda_graphs: bool = False):
    """The compiled step; with ``cuda_graphs``, also captured in CUDA graphs and replayed, one launch per step.

    Captured by inductor's CUDA graph trees (mode "reduce-overhead") rather than by our own ``torch.cuda.CUDAGraph``:
    the trees warm the step up before capturing, keep every graph (one per model, plan, batch and cache length) in
    one memory pool, copy the new token and slot into the graph's inputs before each replay, capture afresh when a
    new cache (a new Decoder) is given, and where a graph cannot be captured run the compiled kernels without one,
    counting why (``counters["inductor"]["cudagraph_skips"]``), where our own capture would have to handle all of
    that. The step has no host sync on CUDA (top-k and threshold routing: ``dsmoe.kernels``), which capture needs."""
    mode = "reduce-overhead" if cuda_graphs else None
    return torch.compile(_decode_step, fullgraph=True, dynamic=False, mode=mode)


def cache_length(needed: int, max_seq_len: int) -> int:
    """The compiled decoder's cache length for ``needed`` slots: rounded up to a multiple of 64 (capped at the
    model's max_seq_len), so that requests of nearby lengths share one compiled graph. Not to a power of two: every
    step attends to every slot, so slack costs time, most at large batches."""
    if needed > max_seq_len:
        raise ValueError(f"{needed} tokens exceed the model's max_seq_len {max_seq_len}")
    return min(max_seq_len, -(-needed // 64) * 64)


class Decoder:
    """Prefill, then one token per step through a preallocated KV cache of ``batch_size`` x ``needed`` slots, under
    ``plan`` (None: as trained), each forward's router records added to ``meter`` when one is given.

    Eager: the cache is read up to the last written slot. Compiled (``compile=True``): each step is one call of a
    ``torch.compile``'d graph (``fullgraph``, static shapes): the token's slot is a 0-d tensor, attention reads every
    slot with the unwritten ones masked, and the step writes its keys and values in place, so nothing recompiles from
    step to step; a graph is made once per model, plan, batch size and cache length (rounded up by
    ``cache_length``). The compiled step returns the experts each token used, so a compiled decode is metered too.
    Both give the same tokens (tests/test_decode.py). The prefill runs eager either way."""

    def __init__(
        self,
        model: Transformer,
        batch_size: int,
        needed: int,
        *,
        plan: SparsePlan | None = None,
        compile: bool = False,
        meter: ActiveMeter | None = None,
    ):
        self.model, self.plan, self.compile, self.meter = (
            model,
            plan or trained_plan(model.cfg),
            compile,
            meter,
        )
        # the compiled step reaches the sparse kernels through their custom ops: a graph without breaks
        self.step_plan = self.plan.with_kernels(compiled=True) if compile else self.plan
        length = cache_length(needed, model.cfg.max_seq_len) if compile else needed
        self.cache = model.new_cache(batch_size, length)
        device = model.embed.weight.device
        self.key_mask_BS = torch.ones(batch_size, length, dtype=torch.bool, device=device)
        self.cuda_graphs = compile and device.type == "cuda"
        if self.cuda_graphs:
            # The graphs read and write the cache and mask where they lie (static inputs), with no copy in or out
            # per replay; unguarded, so that another Decoder's cache reuses the compiled step (captured afresh).
            for t in (*self.cache.k, *self.cache.v, self.key_mask_BS):
                torch._dynamo.mark_static_address(t, guard=False)
        self.padded = False
        self.pos = 0

    def _forward(self, idx_BT: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.model(idx_BT, plan=self.plan, cache=self.cache, last_only=True, **kwargs)
        if self.meter is not None:
            self.meter.update(out.routers)
        return out.logits[:, -1]

    @torch.inference_mode()
    def prefill(self, prompt_BT: torch.Tensor, prompt_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] after the prompts (left-padded, ``prompt_mask_BT`` False on the padding)."""
        t = prompt_BT.shape[1]
        padded = {}
        if prompt_mask_BT is not None:
            self.key_mask_BS[:, :t] = prompt_mask_BT
            self.padded = True
            padded = {"key_mask_BS": self.key_mask_BS[:, :t]}
        self.pos = t
        return self._forward(prompt_BT, **padded)

    @torch.inference_mode()
    def step(self, token_B: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after one more token per row, written at the next slot."""
        pos, self.pos = self.pos, self.pos + 1
        if pos >= self.cache.max_len:
            raise ValueError(f"KV cache is full: writing position {pos} into a cache of {self.cache.max_len}")
        token_B1 = token_B[:, None]
        if self.compile:
            slot = torch.tensor(pos, device=token_B.device)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer read
            with torch._dynamo.config.patch(recompile_limit=COMPILED_GRAPHS):
                logits, counts = _compiled_decode_step(self.cuda_graphs)(
                    self.model, token_B1, slot, self.key_mask_BS, self.cache, self.step_plan
                )
            if self.cuda_graphs:  # a replay overwrites its outputs: the caller keeps copies
                logits, counts = logits.clone(), counts.clone()
            if self.meter is not None:
                self.meter.update_counts(counts)
            return logits
        padded = {"key_mask_BS": self.key_mask_BS[:, : pos + 1]} if self.padded else {}
        return self._forward(token_B1, start_pos=pos, **padded)


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
    plan: SparsePlan | None = None,
    compile: bool = False,
    meter: ActiveMeter | None = None,
) -> torch.Tensor:
    """Continue each prompt by up to ``max_new_tokens``; returns prompt + generated ids. Prompts of different lengths
    are left-padded, with ``prompt_mask_BT`` False on the padding; each then continues exactly as it would alone.
    Runs under ``plan`` (None: as trained). Sequences that emit ``eos_token_id`` are padded with it until all have
    finished. ``compile``: decode through the compiled step; ``meter``: counts active experts (see ``Decoder``)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    b, t = prompt_BT.shape
    total = t + max_new_tokens
    decoder = Decoder(model, b, total, plan=plan, compile=compile, meter=meter)
    out = torch.empty(b, total, dtype=prompt_BT.dtype, device=prompt_BT.device)
    out[:, :t] = prompt_BT
    done = torch.zeros(b, dtype=torch.bool, device=prompt_BT.device)
    logits = decoder.prefill(prompt_BT, prompt_mask_BT)
    for pos in range(t, total):
        token = sample_next(logits, temperature, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        out[:, pos] = token
        if pos + 1 == total or (eos_token_id is not None and bool(done.all())):
            return out[:, : pos + 1]
        logits = decoder.step(token)
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
    plan: SparsePlan | None = None,
    compile: bool = False,
) -> Iterator[int]:
    """One prompt's continuation, one token id at a time as it is chosen: what ``generate`` gives a batch of one,
    for callers that pass tokens on as they come (``dsmoe serve``). Stops after ``max_new_tokens`` or after
    yielding ``eos_token_id``. ``plan`` and ``compile``: as for ``generate``."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    t = prompt_T.shape[0]
    decoder = Decoder(model, 1, t + max_new_tokens, plan=plan, compile=compile)
    logits = decoder.prefill(prompt_T[None])
    for pos in range(t, t + max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        yield int(token)
        if int(token) == eos_token_id or pos + 1 == t + max_new_tokens:
            return
        logits = decoder.step(token)
