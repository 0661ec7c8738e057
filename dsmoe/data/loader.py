"""`TokenLoader`: memory-mapped token shards -> seeded, resumable batches of (x, y) windows for training, and
sequential batches for evaluation. Data-parallel ranks take disjoint slices of each global batch."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsmoe.data.corpus import read_documents
from dsmoe.data.errors import DataError
from dsmoe.data.shards import SPLITS, is_val_document


def read_index(data_dir: str | Path) -> dict[str, Any]:
    """The `index.json` that `dsmoe prepare` wrote into `data_dir`."""
    path = Path(data_dir) / "index.json"
    if not path.is_file():
        raise DataError(
            f"{data_dir} has no index.json: it is not a prepared shard folder; run `dsmoe prepare "
            f"--out {data_dir} ...` first"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); prepare the folder again") from None


def held_out_documents(data_dir: str | Path) -> list[str]:
    """The text of the val documents of a prepared corpus, in corpus order: read again from the sources that
    ``index.json`` names and split by the same seeded hash. Nothing trains on them, so they are an in-domain
    held-out set whose bytes and words can be counted (the shards hold only token ids)."""
    index = read_index(data_dir)
    seed, fraction = index.get("seed"), index.get("val_fraction")
    if seed is None or fraction is None or not index.get("sources"):
        raise DataError(
            f"{data_dir}/index.json does not record its sources, seed and val_fraction (prepared by an older "
            "dsmoe): prepare the corpus again to read its held-out documents"
        )
    docs = [text for text in read_documents(index["sources"]) if is_val_document(text, seed, fraction)]
    if len(docs) != index["documents"]["val"]:
        raise DataError(
            f"the sources of {data_dir} give {len(docs)} held-out documents, index.json counts "
            f"{index['documents']['val']}: the corpus files changed since it was prepared; prepare it again"
        )
    return docs


class TokenLoader:
    """Batches of `seq_len + 1`-token windows from one split, as int64 tensors x, y of shape [batch_size, seq_len]
    with y = x shifted by one.

    An epoch visits every non-overlapping window of the concatenated token stream once, in a permutation seeded by
    `seed + epoch`. A global batch holds `batch_size * world_size` windows; rank r takes windows
    [r * batch_size, (r + 1) * batch_size) of it, so the ranks together see what one rank with the whole batch would.
    Iterating never ends: after the last full global batch of an epoch the next epoch starts.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.index = read_index(self.data_dir)
        self.vocab_size = int(self.index["vocab_size"])
        self.model_vocab_size = vocab_size
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise DataError(
                f"shards in {self.data_dir} were tokenized with a vocabulary of {self.vocab_size} ids, "
                f"more than the model's vocab_size {vocab_size}; raise the model's vocab_size to at "
                f"least {self.vocab_size} or prepare the data with the model's tokenizer"
            )
        # A few unused rows are normal: a BPE trained short of its target, an embedding padded to a round size.
        if vocab_size is not None and vocab_size - self.vocab_size > vocab_size // 10:
            unused = vocab_size - self.vocab_size
            warnings.warn(
                f"shards in {self.data_dir} were tokenized with a vocabulary of {self.vocab_size} ids, fewer "
                f"than the model's vocab_size {vocab_size}: {unused} embedding rows ({unused / vocab_size:.0%}) "
                f"are never trained; set model.vocab_size={self.vocab_size} or prepare the data with the "
                "model's tokenizer",
                stacklevel=2,
            )
        self._shards = self._open_shards()
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])
        self.total_tokens = int(self._starts[-1])
        self.windows_per_epoch = max(0, (self.total_tokens - 1) // seq_len)
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = self.windows_per_epoch // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the {split} split of {self.data_dir} has {self.total_tokens} tokens, fewer than one "
                f"global batch needs ({self.global_batch} windows of {seq_len + 1} tokens); use a smaller "
                "batch_size or seq_len, or more data"
            )
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None

    def _open_shards(self) -> list[np.ndarray]:
        dtype = np.dtype(self.index["dtype"])
        shards: list[np.ndarray] = []
        for entry in self.index["shards"].get(self.split, []):
            path = self.data_dir / entry["file"]
            expected = int(entry["tokens"]) * dtype.itemsize
            if not path.is_file():
                raise DataError(
                    f"shard {path} listed in index.json is missing; prepare {self.data_dir} again"
                )
            actual = path.stat().st_size
            if actual != expected:
                raise DataError(
                    f"shard {path} is {actual} bytes but index.json says {entry['tokens']} tokens "
                    f"({expected} bytes): it is truncated or was modified; prepare {self.data_dir} again"
                )
            if entry["tokens"]:
                shards.append(np.memmap(path, dtype=dtype, mode="r"))
        return shards

    def _window(self, start: int) -> np.ndarray:
        """Tokens [start, start + seq_len + 1) of the concatenated stream, across shard boundaries if needed."""
        length = self.seq_len + 1
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        offset = start - int(self._starts[shard])
        if offset + length <= len(self._shards[shard]):
            return self._shards[shard][offset : offset + length]
        parts, need = [], length
        while need:
            piece = self._shards[shard][offset : offset + need]
            parts.append(piece)
            need -= len(piece)
            shard, offset = shard + 1, 0
        return np.concatenate(parts)

    def _batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = np.stack([self._window(int(w) * self.seq_len) for w in window_ids]).astype(np.int64)
        limit = self.model_vocab_size or self.vocab_size
        if tokens.size and int(tokens.max()) >= limit:  # a shard edited or written by another tool
            window = int(window_ids[int(np.argmax(tokens.max(axis=1)))])
            raise DataError(
                f"token id {int(tokens.max())} in the {self.split} shards of {self.data_dir} (window "
                f"{window}, tokens {window * self.seq_len}..{(window + 1) * self.seq_len}) is outside "
                f"the vocabulary of {limit}; the shards are corrupted or were tokenized with another "
                "tokenizer: prepare the data again"
            )
        tokens_t = torch.from_numpy(tokens)
        return tokens_t[:, :-1], tokens_t[:, 1:]

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng(self.seed + self.epoch).permutation(self.windows_per_epoch)
        return self._order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        first = self.position * self.global_batch + self.rank * self.batch_size
        window_ids = self._epoch_order()[first : first + self.batch_size]
        self.position += 1
        return self._batch(window_ids)

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: load it into a loader built with the same arguments to continue exactly."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` left off. A state saved with another global batch (a run resumed on another
        number of processes) continues at the same window of the epoch, when that is a whole number of this
        loader's global batches; the epochs after it end where this loader's do."""
        for key in ("seed", "seq_len"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"loader state has {key}={state[key]} but this loader has {getattr(self, key)}; "
                    f"resume with the same seed and seq_len"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        saved_batch = int(state.get("global_batch", self.global_batch))
        if saved_batch != self.global_batch:
            windows = position * saved_batch
            if windows % self.global_batch:
                raise DataError(
                    f"loader state is {windows} windows into epoch {epoch}, not a whole number of this loader's "
                    f"global batches of {self.global_batch} windows (batch_size * world_size); resume with "
                    f"batch_size * world_size = {saved_batch}, as the state was saved"
                )
            position = windows // self.global_batch
        self.epoch, self.position, self._order = epoch, position, None

    def iter_eval(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows in stream order, this rank's slice of each global batch; stops after `max_batches` batches or at
        the last full global batch. Does not touch the training position."""
        count = self.batches_per_epoch if max_batches is None else min(max_batches, self.batches_per_epoch)
        for batch in range(count):
            first = batch * self.global_batch + self.rank * self.batch_size
            yield self._batch(np.arange(first, first + self.batch_size))
