"""Data: tokenizers, corpus readers, real-data sources from package registries, the shard writer and the
memory-mapped, resumable token loader."""

from dsmoe.data.corpus import read_documents
from dsmoe.data.errors import DataError
from dsmoe.data.loader import TokenLoader, read_index
from dsmoe.data.shards import prepare
from dsmoe.data.sources import fetch, fetch_corpus, list_sources
from dsmoe.data.tokenizer import (
    codegen_tokenizer,
    eos_id,
    gpt2_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)

__all__ = [
    "DataError",
    "TokenLoader",
    "codegen_tokenizer",
    "eos_id",
    "fetch",
    "fetch_corpus",
    "gpt2_tokenizer",
    "list_sources",
    "load_tokenizer",
    "prepare",
    "read_documents",
    "read_index",
    "save_tokenizer",
    "train_bpe",
]
