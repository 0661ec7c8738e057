"""Perplexity of a checkpoint on held-out text under one sparse-inference setting, with the active parameters
measured over the same tokens: what ``dsmoe eval`` prints and ``dsmoe sweep`` repeats over a grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dsmoe.config import ConfigError
from dsmoe.evaluation.perplexity import perplexity
from dsmoe.inference.meter import ActiveMeter
from dsmoe.model.plan import SparsePlan

if TYPE_CHECKING:
    from dsmoe.model.transformer import Transformer

WIKIPEDIA_NOTE = (
    "English Wikipedia articles from gensim's test dump (dsmoe source 'wikipedia'); this is not "
    "WikiText, which no package registry ships, so figures are not comparable to published WikiText "
    "perplexities"
)


@dataclass(frozen=True)
class EvalText:
    documents: list[str]
    description: dict  # where the documents came from, for the JSON output


def load_eval_text(
    text: str | Path | None = None,
    dataset: str | None = None,
    source: str | None = None,
    *,
    field: str = "text",
    split: str = "test",
    max_docs: int | None = None,
    data_dir: str | Path | None = None,
) -> EvalText:
    """Documents from exactly one of: a text/JSONL file or folder, a Hugging Face dataset (save_to_disk folder or
    hub name), or a fetched dsmoe source such as 'wikipedia'. ``max_docs`` keeps the first N."""
    from itertools import islice

    from dsmoe.data.corpus import read_documents

    if sum(x is not None for x in (text, dataset, source)) != 1:
        raise ConfigError("give exactly one of --text FILE, --dataset NAME or --source NAME")
    if max_docs is not None and max_docs < 1:
        raise ConfigError(f"--max-docs must be >= 1, got {max_docs}")
    description: dict[str, str | int]
    if source is not None:
        from dsmoe.data.sources import fetch_corpus

        docs = read_documents(fetch_corpus(source, data_dir), field="text")
        description = {"source": source}
        if source == "wikipedia":
            description["note"] = WIKIPEDIA_NOTE
    elif dataset is not None:
        docs = read_documents(dataset=dataset, field=field, split=split)
        description = {"dataset": dataset, "split": split, "field": field}
    else:
        docs = read_documents([text], field=field)  # type: ignore[list-item]
        description = {"text": str(text)}
    documents = list(islice(docs, max_docs))
    description["documents"] = len(documents)
    return EvalText(documents, description)


def evaluate_text(
    model: Transformer,
    tokenizer,
    documents: list[str],
    plan: SparsePlan | None = None,
    *,
    batch_size: int = 16,
    max_len: int | None = None,
    progress: bool = False,
) -> dict:
    """Perplexities (word, token, byte), bits per byte and the measured active parameters under ``plan`` (None: as
    trained)."""
    from dsmoe.data.tokenizer import eos_id

    cfg = model.cfg
    plan = plan or SparsePlan.build(cfg)
    max_len = max_len or cfg.max_seq_len
    if not 1 <= max_len <= cfg.max_seq_len:
        raise ConfigError(f"--max-len {max_len} must be in 1..{cfg.max_seq_len} (the model's max_seq_len)")
    meter = ActiveMeter(cfg)
    result = perplexity(
        model,
        tokenizer,
        documents,
        max_len,
        eos_id(tokenizer),
        progress=progress,
        batch_size=batch_size,
        plan=plan,
        meter=meter,
    )
    summary = meter.summary()
    return {
        **result,
        "active_params": summary["active_params"],
        "active_share": summary["active_share"],
        "active_hidden": summary["active_hidden"],
        "non_embedding_params": summary["non_embedding_params"],
        "layers": summary["layers"],
        "att_strategy": plan.describe("att"),
        "mlp_strategy": plan.describe("mlp"),
        "max_len": max_len,
        "batch_size": batch_size,
    }
