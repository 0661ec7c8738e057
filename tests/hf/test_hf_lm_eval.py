"""lm-eval's stock `hf` model type evaluates an exported folder; its loglikelihoods equal the native model's."""

import json

import pytest
import torch

from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.training.checkpoint import load_pretrained

DOCS = [
    {
        "context": "The old man crosses the bridge. A dog",
        "choices": ["sees the market.", "waits for the river."],
        "label": 0,
    },
    {
        "context": "My sister builds",
        "choices": ["a red house.", "the long road.", "an open door."],
        "label": 1,
    },
    {
        "context": "The committee remembers the morning. The cat",
        "choices": ["sings to the bridge."],
        "label": 0,
    },
]

TASK = """task: dsmoe_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
"""


def native_loglikelihood(model, tokenizer, context: str, continuation: str, plan=None) -> float:
    """Sum of log p(continuation tokens | context), tokenized as lm-eval does for causal models: encode the whole
    string, the continuation is what follows the context's own encoding."""
    whole = tokenizer.encode(context + continuation).ids
    n_context = len(tokenizer.encode(context).ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1], plan=plan).logits.double(), dim=-1)[0]
    targets = ids[0, n_context:]
    return float(logprobs[n_context - 1 :].gather(-1, targets[:, None]).sum())


def test_lm_eval_hf_model_type_on_exported_folder(exported, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the 'eval' extra")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint, folder = exported
    data = tmp_path / "tasks" / "docs.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (data.parent / "tiny.yaml").write_text(TASK.format(data=data))

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
        tasks=["dsmoe_tiny_choice"],
        task_manager=TaskManager(include_path=str(data.parent), include_defaults=False),
        device="cpu",
        batch_size=2,
        log_samples=True,
    )

    native, tokenizer = load_pretrained(checkpoint)
    plan = SparsePlan.build(native.cfg, mlp=SparseSetting("topk", k=3))  # the export's config.json setting
    samples = sorted(results["samples"]["dsmoe_tiny_choice"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for sample, doc in zip(samples, DOCS, strict=True):
        got = [float(resp[0][0]) for resp in sample["resps"]]
        expected = [
            native_loglikelihood(native, tokenizer, doc["context"], " " + c, plan) for c in doc["choices"]
        ]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
