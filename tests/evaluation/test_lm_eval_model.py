"""The `dsmoe` lm-eval model against direct computations with the model, and lm-eval end to end, offline."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from dsmoe.data.tokenizer import eos_id
from dsmoe.evaluation.lm_eval_model import DSMoELM, cut_at_stop
from dsmoe.evaluation.perplexity import perplexity, rolling_loglikelihoods, rolling_windows
from dsmoe.evaluation.zero_shot import render_tasks
from dsmoe.inference import generate as generate_module
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.training.checkpoint import load_pretrained

FIXTURES = Path(__file__).with_name("fixtures")
PAIRS = [
    ("The cat sees", " the bridge."),
    ("A dog follows the", " long road. The river waits"),
    ("My sister builds", " a red house."),
    ("", "The old man crosses the market."),
    ("The committee remembers ", "the morning."),
]


def requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def lm(checkpoint, **kwargs):
    return DSMoELM(checkpoint=str(checkpoint), device="cpu", **kwargs)


def direct_loglikelihood(model, tok, context, continuation, plan=None):
    """lm-eval's split: trailing spaces of the context move to the continuation; an empty context is the EOS."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation).ids
    ctx = tok.encode(context).ids if context else [eos_id(tok)]
    cont = whole[len(ctx) :] if context else whole
    ids = ctx + cont
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]]), plan=plan).logits[0].double(), -1)
    rows = logprobs[len(ctx) - 1 :]
    return float(rows.gather(1, torch.tensor(cont)[:, None]).sum()), bool(
        (rows.argmax(-1) == torch.tensor(cont)).all()
    )


@pytest.mark.parametrize(
    "strategy", [{}, {"strategy": "topk", "k": "3", "att_strategy": "threshold", "att_threshold": "0.9"}]
)
def test_loglikelihood_equals_direct_computation(tiny_checkpoint, strategy):
    model, tok = load_pretrained(tiny_checkpoint)
    att = SparseSetting(strategy["att_strategy"], threshold=0.9) if strategy else None
    mlp = SparseSetting("topk", k=3) if strategy else None
    plan = SparsePlan.build(model.cfg, att=att, mlp=mlp)
    expected = [direct_loglikelihood(model, tok, c, x, plan) for c, x in PAIRS]
    for batch_size in (1, 4):
        got = lm(tiny_checkpoint, batch_size=batch_size, **strategy).loglikelihood(
            requests("loglikelihood", PAIRS), disable_tqdm=True
        )
        for (lp, greedy), (want_lp, want_greedy) in zip(got, expected, strict=True):
            assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4)
            assert greedy == want_greedy


def test_loglikelihood_rolling_equals_perplexity_module(tiny_checkpoint, eval_docs):
    model, tok = load_pretrained(tiny_checkpoint)
    expected = rolling_loglikelihoods(
        model, [tok.encode(d).ids for d in eval_docs], eos_id(tok), 48, batch_size=1
    )
    docs = requests("loglikelihood_rolling", [(d,) for d in eval_docs])
    for batch_size in (1, 5):
        adapter = lm(tiny_checkpoint, batch_size=batch_size)
        assert adapter.loglikelihood_rolling(docs, disable_tqdm=True) == pytest.approx(expected, rel=1e-6)
        summary = adapter.active_summary()
        assert (
            summary["active_hidden"] == 1.0 and summary["active_params"] == adapter.cfg.non_embedding_params
        )


def test_active_parameters_accumulate_over_scored_tokens(tiny_checkpoint, eval_docs):
    adapter = lm(tiny_checkpoint, strategy="topk", k=2, att_strategy="topk", att_k=1, batch_size=3)
    adapter.loglikelihood_rolling(
        requests("loglikelihood_rolling", [(d,) for d in eval_docs]), disable_tqdm=True
    )
    cfg = adapter.cfg
    windows = [w for d in eval_docs for w in rolling_windows(adapter.tok_encode(d), adapter.eot_token_id, 48)]
    assert adapter.meter.tokens["mlp"][0] == sum(
        len(ids) - 1 for ids, _ in windows
    )  # every input token, no padding
    assert adapter.active_summary()["active_params"] == pytest.approx(cfg.active_params(1, 2))
    assert adapter.get_model_info()["dsmoe_active_params"] == pytest.approx(cfg.active_params(1, 2))
    assert adapter.get_model_info()["dsmoe_active_share"] == pytest.approx(
        cfg.active_params(1, 2) / cfg.non_embedding_params
    )


def test_generate_until_matches_generate(tiny_checkpoint):
    model, tok = load_pretrained(tiny_checkpoint)
    prompts = ["The cat sees", "A dog follows", "The cat", "My sister builds a"]
    gen = {"until": ["house"], "max_gen_toks": 6}
    expected = []
    for p in prompts:
        out = generate_module.generate(model, torch.tensor([tok.encode(p).ids]), 6, eos_token_id=eos_id(tok))
        new = out[0, len(tok.encode(p).ids) :].tolist()
        new = new[: new.index(eos_id(tok))] if eos_id(tok) in new else new
        expected.append(cut_at_stop(tok.decode(new), ["house"]))
    for batch_size in (1, 3):
        got = lm(tiny_checkpoint, batch_size=batch_size).generate_until(
            requests("generate_until", [(p, gen) for p in prompts]), disable_tqdm=True
        )
        assert got == expected


def test_cut_at_stop():
    assert cut_at_stop("abc\n\ndef. ghi", ["\n\n", "."]) == "abc"
    assert cut_at_stop("abc", []) == "abc"


def test_bad_arguments_say_what_to_do(tiny_checkpoint):
    from dsmoe.config import ConfigError

    with pytest.raises(ConfigError, match="needs an integer k in 1..8 .*; add k=N to --model_args"):
        lm(tiny_checkpoint, strategy="topk")
    with pytest.raises(ConfigError, match="add att_k=N to --model_args"):
        lm(tiny_checkpoint, att_strategy="topk", att_k="0")
    with pytest.raises(ConfigError, match="max_length"):
        lm(tiny_checkpoint, max_length=1000)


def test_sparse_settings_are_checked_before_the_weights_load(tiny_checkpoint, monkeypatch):
    from dsmoe.config import ConfigError
    from dsmoe.training import checkpoint

    monkeypatch.setattr(checkpoint, "load_model_state", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match="mlp: strategy 'topk' needs an integer k in 1..8 .*got k=9"):
        lm(tiny_checkpoint, strategy="topk", k="9")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, eval_docs):
    """The shipped PIQA YAML and a fixture rolling task, rendered over local JSONL files."""
    data = tmp_path_factory.mktemp("items")
    shutil.copytree(FIXTURES / "items" / "piqa", data / "piqa")
    (data / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in eval_docs))
    templates = tmp_path_factory.mktemp("templates")
    shutil.copy(Path(__file__).parents[2] / "dsmoe/evaluation/tasks/dsmoe_piqa.yaml", templates)
    shutil.copy(FIXTURES / "tasks/tiny_rolling.yaml", templates)
    return render_tasks(data, tmp_path_factory.mktemp("rendered") / "tasks", templates)


def test_lm_eval_end_to_end_offline(tiny_checkpoint, task_dir, eval_docs, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="dsmoe",
        model_args=f"checkpoint={tiny_checkpoint},strategy=topk,k=4",
        device="cpu",
        batch_size=4,
        tasks=["dsmoe_piqa", "tiny_rolling"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    piqa, rolling = results["results"]["dsmoe_piqa"], results["results"]["tiny_rolling"]
    assert 0.0 <= piqa["acc,none"] <= 1.0 and 0.0 <= piqa["acc_norm,none"] <= 1.0
    assert results["n-samples"]["dsmoe_piqa"]["effective"] == 3

    model, tok = load_pretrained(tiny_checkpoint)
    plan = SparsePlan.build(model.cfg, mlp=SparseSetting("topk", k=4))
    ours = perplexity(model, tok, eval_docs, 48, eos_id(tok), plan=plan)
    assert rolling["word_perplexity,none"] == pytest.approx(ours["word_perplexity"], rel=1e-6)
    assert rolling["byte_perplexity,none"] == pytest.approx(ours["byte_perplexity"], rel=1e-6)
    assert rolling["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-6)
    config = results["config"]
    assert config["dsmoe_mlp_strategy"] == "topk(k=4)"
    assert config["dsmoe_active_params"] == pytest.approx(model.cfg.active_params(4, 4))
