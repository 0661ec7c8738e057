"""`prepare`: tokenize a corpus into flat token shards (`train-00000.bin`, `val-00000.bin`) plus `index.json` and the
tokenizer, written to a temporary folder and renamed at the end so a killed run leaves nothing half-written."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from dsmoe.data.corpus import read_documents
from dsmoe.data.errors import DataError
from dsmoe.data.tokenizer import eos_id, fingerprint, load_tokenizer, save_tokenizer, vocab_size

INDEX_FORMAT = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
_BATCH_DOCS = 256
_BATCH_CHARS = 200_000
# A val split smaller than this draws a warning. Each document's split is a hash of its own text, so it never depends
# on the rest of the corpus; prepare therefore cannot top the split up, and says which val_fraction would.
MIN_VAL_DOCUMENTS = 10


def token_dtype(vocab: int) -> np.dtype:
    """uint16 while every id fits in it, else uint32."""
    return np.dtype(np.uint16) if vocab <= 2**16 else np.dtype(np.uint32)


def is_val_document(text: str, seed: int, val_fraction: float) -> bool:
    """Split by a seeded hash of the document's text: deterministic, independent of order, duplicates stay together."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()
    ).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


@dataclass
class _ShardWriter:
    """Appends token ids to `{split}-NNNNN.bin` files, starting a new file every `shard_tokens` tokens."""

    folder: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    documents: int = 0
    _file: BinaryIO | None = None

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            chunk, ids = ids[:room], ids[room:]
            assert self._file is not None
            self._file.write(chunk.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += int(chunk.size)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = (self.folder / name).open("wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode_in_worker(texts: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None
    return [e.ids for e in _worker_tokenizer.encode_batch(texts, add_special_tokens=False)]


def _batches(
    docs: Iterable[str], max_docs: int = _BATCH_DOCS, max_chars: int = _BATCH_CHARS
) -> Iterator[list[str]]:
    """Groups of documents small enough to spread long documents (whole books, speeches) over the workers."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded_batches(
    tok: Tokenizer, docs: Iterable[str], workers: int
) -> Iterator[tuple[list[str], list[list[int]]]]:
    """(texts, ids) per batch of documents, in corpus order; `workers` > 1 tokenizes in that many processes."""
    if workers <= 1:
        for texts in _batches(docs, _BATCH_DOCS):
            yield texts, [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        return
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    with context.Pool(workers, initializer=_init_worker, initargs=(tok.to_str(),)) as pool:
        # A bounded queue of batches in flight: results come back in corpus order and memory stays flat.
        in_flight: deque[tuple[list[str], AsyncResult]] = deque()
        for texts in _batches(docs, _BATCH_DOCS):
            in_flight.append((texts, pool.apply_async(_encode_in_worker, (texts,))))
            if len(in_flight) >= 2 * workers:
                done_texts, result = in_flight.popleft()
                yield done_texts, result.get()
        while in_flight:
            done_texts, result = in_flight.popleft()
            yield done_texts, result.get()


def prepare(
    inputs: Sequence[str | Path],
    tokenizer: Tokenizer | str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.005,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    seed: int = 0,
    field: str = "text",
    encoding: str = "utf-8",
    dataset: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize the documents of `inputs` (and an optional Hugging Face `dataset`) into `out_dir`: EOS after every
    document, a seeded `val_fraction` of documents into the val split, `index.json`, and the tokenizer. Returns the
    index. `workers` defaults to the number of CPU cores."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not overwrite:
        raise DataError(f"output folder {out_dir} already exists; choose another --out or pass --overwrite")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    vocab, eos = vocab_size(tok), eos_id(tok)
    dtype = token_dtype(vocab)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    docs = read_documents(inputs, field=field, encoding=encoding, dataset=dataset)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
    try:
        bar = tqdm(
            desc=f"tokenizing -> {out_dir.name}", unit=" docs", disable=not progress or None, smoothing=0.1
        )
        for texts, batch_ids in _encoded_batches(tok, docs, workers):
            for text, ids in zip(texts, batch_ids, strict=True):
                writer = writers["val" if is_val_document(text, seed, val_fraction) else "train"]
                array = np.fromiter(ids, dtype=np.int64, count=len(ids))
                if array.size and int(array.max()) >= vocab:
                    raise DataError(
                        f"document {writers['train'].documents + writers['val'].documents + 1} "
                        f"has token id {int(array.max())} >= vocab size {vocab}; the tokenizer is "
                        "inconsistent: rebuild it or save it again"
                    )
                writer.write(np.append(array, eos))
                writer.documents += 1
            bar.update(len(texts))
            bar.set_postfix(tokens=writers["train"].tokens + writers["val"].tokens, refresh=False)
        bar.close()
        for writer in writers.values():
            writer.close()
        index = {
            "format": INDEX_FORMAT,
            "dtype": dtype.name,
            "vocab_size": vocab,
            "eos_id": eos,
            "tokenizer_sha256": fingerprint(tok),
            "tokenizer": "tokenizer.json",
            "sources": [str(Path(i).expanduser().resolve()) for i in inputs] + ([dataset] if dataset else []),
            "seed": seed,
            "val_fraction": val_fraction,
            "documents": {split: w.documents for split, w in writers.items()},
            "tokens": {split: w.tokens for split, w in writers.items()},
            "shards": {split: w.shards for split, w in writers.items()},
        }
        val_docs = writers["val"].documents
        all_docs = val_docs + writers["train"].documents
        if val_fraction > 0 and val_docs < MIN_VAL_DOCUMENTS:
            wanted = min(0.5, math.ceil(1000 * MIN_VAL_DOCUMENTS / max(all_docs, 1)) / 1000)
            count = {0: "no document", 1: "only 1 document"}.get(val_docs, f"only {val_docs} documents")
            warnings.warn(
                f"{count} fell into the val split of {out_dir} (val_fraction={val_fraction}, {all_docs} "
                f"documents): a validation loss over so few is noise; pass --val-fraction {wanted} or more to "
                f"hold out about {MIN_VAL_DOCUMENTS}",
                stacklevel=2,
            )
        save_tokenizer(tok, tmp)
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index
