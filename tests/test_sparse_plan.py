"""The sparse plan: one frozen value per model run, read by one parser from every source (flags, lm-eval's
model_args, a Hugging Face config, a settings file) with one validator, passed to the forward; nothing is stored on
the model's modules."""

import dataclasses
import json

import pytest
import torch
from helpers import small_config

from dsmoe.config import ConfigError
from dsmoe.model.plan import FIELDS, FLAGS, SparsePlan, Spelling, trained_plan
from dsmoe.model.settings import DENSE, Kernels, SparseSetting
from dsmoe.model.settings_file import load_plan, plan_to_dict
from dsmoe.model.transformer import Transformer

CFG = small_config(n_layers=3)  # 4 attention experts, 8 MLP experts


def test_every_source_reads_the_same_plan(tmp_path):
    """Flags, lm-eval's text arguments, a Hugging Face config's fields and a settings file give one value."""
    from argparse import Namespace

    from dsmoe.evaluation.lm_eval_model import MODEL_ARGS
    from dsmoe.inference.arguments import plan_from_args

    expected = SparsePlan.build(CFG, SparseSetting("topk", k=2), SparseSetting("threshold", threshold=1.5))
    flags = Namespace(
        strategy="threshold",
        k=None,
        threshold=1.5,
        att_strategy="topk",
        att_k=2,
        att_threshold=None,
        settings=None,
    )
    assert plan_from_args(flags, CFG) == expected
    text = {"att_strategy": "topk", "att_k": "2", "mlp_strategy": "threshold", "mlp_threshold": "1.5"}
    assert SparsePlan.parse(text, CFG, MODEL_ARGS) == expected
    assert SparsePlan.parse(expected.fields(), CFG) == expected  # a Hugging Face config's fields
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(plan_to_dict(expected)))
    assert load_plan(path, CFG) == expected


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"mlp_strategy": "topk"},
            "mlp: strategy 'topk' needs an integer k in 1..8 (the layer's 8 experts), got k=None",
        ),
        ({"mlp_strategy": "topk", "mlp_k": 9}, "needs an integer k in 1..8"),
        ({"att_strategy": "topk", "att_k": 5}, "att: strategy 'topk' needs an integer k in 1..4"),
        ({"mlp_strategy": "threshold", "mlp_threshold": 99}, "needs a threshold in (0, 8]"),
        (
            {"mlp_strategy": "threshold", "mlp_threshold": 1.0, "mlp_k": 2},
            "k is read by strategy 'topk' only",
        ),
        ({"mlp_k": 2}, "mlp_k needs mlp_strategy"),
        ({"mlp_strategy": "top2"}, "unknown sparse strategy 'top2'"),
        (
            {"mlp_strategy": ["topk", None], "mlp_k": [2, None]},
            "mlp_strategy has 2 entries for a model with 3 layers",
        ),
        (
            {"mlp_strategy": [None, None, "topk"], "mlp_k": [None, None, 0]},
            "mlp layer 2: strategy 'topk' needs",
        ),
        ({"mlp_kk": 2}, "unknown sparse setting(s) mlp_kk"),
        ({"normalize_weights": "yes"}, "normalize_weights must be true or false"),
    ],
)
def test_one_validator_with_one_error_style(values, message):
    with pytest.raises(ConfigError) as err:
        SparsePlan.parse(values, CFG, Spelling(where="here"))
    assert str(err.value).startswith("here: ") and message in str(err.value)


def test_each_source_names_the_fields_as_its_user_writes_them():
    with pytest.raises(ConfigError, match="the command line: mlp: .*; pass --k N$"):
        SparsePlan.parse({"mlp_strategy": "topk"}, CFG, FLAGS)
    with pytest.raises(ConfigError, match="--att-k needs --att-strategy"):
        SparsePlan.parse({"att_k": 2}, CFG, FLAGS)
    # numbers are read from text only where the source writes text
    with pytest.raises(ConfigError, match=r"threshold in \(0, 8\] .*got '1.5'"):
        SparsePlan.parse({"mlp_strategy": "threshold", "mlp_threshold": "1.5"}, CFG)


def test_a_kind_without_router_runs_its_one_expert_whatever_the_setting():
    cfg = small_config("smoe")  # one attention expert
    plan = SparsePlan.build(cfg, att=SparseSetting("topk", k=3))
    assert plan.att == (None,) * cfg.n_layers and plan.is_trained


def test_the_plan_round_trips_through_its_fields_and_describes_itself():
    per_layer = [SparseSetting("topk", k=1), None, SparseSetting("threshold", threshold=2.0, normalize=True)]
    plan = SparsePlan.build(CFG, mlp=per_layer)
    assert SparsePlan.parse(plan.fields(), CFG) == plan
    assert plan.fields()["normalize_weights"] is True and set(plan.fields()) <= set(FIELDS)
    assert plan.describe("att") == "trained" and plan.describe("mlp").startswith(
        "per-layer[topk(k=1), trained"
    )
    assert plan.setting("mlp", 1) == DENSE and plan.setting("mlp", 0).k == 1
    assert trained_plan(CFG).is_trained and not plan.is_trained
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.att = ()  # type: ignore[misc]


def test_the_forward_runs_the_plan_it_is_given_and_no_module_holds_one():
    model = Transformer(CFG).eval()
    idx = torch.randint(0, 97, (2, 7))
    top1 = SparsePlan.build(CFG, mlp=SparseSetting("topk", k=1))
    with torch.no_grad():
        dense, sparse, again = model(idx), model(idx, plan=top1), model(idx)
    assert torch.equal(dense.logits, again.logits) and not torch.equal(dense.logits, sparse.logits)
    assert all(r.routing is None for r in dense.routers if r.kind == "mlp")
    assert all(r.routing.counts_per_token.eq(1).all() for r in sparse.routers if r.kind == "mlp")
    assert not any(hasattr(m, "setting") for m in model.modules())


def test_a_kernel_choice_travels_with_the_plan():
    plan = SparsePlan.build(CFG, mlp=SparseSetting("topk", k=2))
    assert plan.kernels == Kernels() and plan.with_kernels("reference").kernels == Kernels("reference")
    assert plan.with_kernels(compiled=True).with_kernels("sorted").kernels == Kernels("sorted", compiled=True)
    model = Transformer(CFG).eval()
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        fast, reference = (model(idx, plan=p).logits for p in (plan, plan.with_kernels("reference")))
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
