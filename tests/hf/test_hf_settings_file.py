"""A per-layer settings file (``dsmoe tune``) through the Hugging Face consumers: ``dsmoe export --settings`` writes
it into config.json, ``DSMoEForCausalLM.load_sparse_settings`` applies it (also in the exported code, without
dsmoe), and ``dsmoe serve --settings`` serves with it. Each gives the logits of the native model sparsified the
same way."""

import json

import pytest
import torch
from helpers import small_config
from hf_fixtures import VOCAB, isolated_python

from dsmoe.cli import main
from dsmoe.config import ConfigError
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.model.settings_file import load_plan, plan_to_dict
from dsmoe.training.checkpoint import load_pretrained

# two layers that differ from each other and from one global setting
ATT = [SparseSetting("threshold", threshold=0.75), None]
MLP = [SparseSetting("topk", k=3), SparseSetting("threshold", threshold=1.25)]
PROMPT = "The old man crosses the bridge. A dog follows the market"


@pytest.fixture(scope="module")
def settings_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("settings") / "settings.json"
    plan = SparsePlan.build(small_config(vocab_size=VOCAB), ATT, MLP)  # the exported model's config
    path.write_text(json.dumps(plan_to_dict(plan, {"made_by": "test"})))
    return path


def native_logits(checkpoint):
    native, tokenizer = load_pretrained(checkpoint)
    plan = SparsePlan.build(native.cfg, att=ATT, mlp=MLP)
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    with torch.no_grad():
        return ids, native(ids, plan=plan).logits


def settings_of(model):
    return list(model.sparse_plan.att), list(model.sparse_plan.mlp)


def test_export_writes_the_settings_into_config_json(exported, settings_file, tmp_path):
    from dsmoe.hf import DSMoEForCausalLM

    checkpoint, _ = exported
    out = tmp_path / "hf"
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--settings", str(settings_file)])
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_strategy"] == ["topk", "threshold"] and config["mlp_k"] == [3, None]
    assert config["att_strategy"] == ["threshold", None] and config["att_threshold"] == [0.75, None]
    model = DSMoEForCausalLM.from_pretrained(out).eval()
    assert settings_of(model) == (ATT, MLP)
    ids, expected = native_logits(checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_settings_with_strategy_flags(exported, settings_file, tmp_path, capsys):
    checkpoint, _ = exported
    argv = [
        "export",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(tmp_path / "x"),
        "--settings",
        str(settings_file),
    ]
    assert main([*argv, "--att-strategy", "dense"]) == 2
    assert "drop --att-strategy or drop --settings" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_load_sparse_settings_replaces_config_settings_and_is_saved(exported, settings_file, tmp_path):
    from dsmoe.hf import DSMoEForCausalLM

    checkpoint, folder = exported  # exported with mlp topk k=3 for every layer
    model = DSMoEForCausalLM.from_pretrained(folder).eval()
    model.load_sparse_settings(settings_file)
    assert settings_of(model) == (ATT, MLP)
    ids, expected = native_logits(checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "saved")
    again = DSMoEForCausalLM.from_pretrained(tmp_path / "saved")
    assert settings_of(again) == (ATT, MLP)


def test_load_sparse_settings_checks_the_file_and_keeps_the_old_settings(exported, tmp_path):
    from dsmoe.hf import DSMoEForCausalLM

    _, folder = exported
    model = DSMoEForCausalLM.from_pretrained(folder)
    before = settings_of(model)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mlp": [{"strategy": "topk", "k": 3}] * 3}))
    with pytest.raises(ConfigError, match="3 entries for a model with 2 layers"):
        model.load_sparse_settings(bad)
    assert settings_of(model) == before


CHILD = """
import json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True).eval()
model.load_sparse_settings({settings!r})
with torch.no_grad():
    logits = model(torch.tensor({ids!r})).logits
print("RESULT" + json.dumps(logits.tolist()))
"""


def test_exported_code_reads_the_settings_file_without_dsmoe(exported, settings_file, tmp_path):
    checkpoint, folder = exported
    ids, expected = native_logits(checkpoint)
    child = isolated_python(
        CHILD.format(folder=str(folder), settings=str(settings_file), ids=ids.tolist()), tmp_path
    )
    assert child.returncode == 0, child.stderr[-3000:]
    logits = torch.tensor(json.loads(child.stdout.split("RESULT", 1)[1]))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_serve_uses_the_settings_file(exported, settings_file, tmp_path):
    from dsmoe.hf.serve import Completer, serve

    checkpoint, folder = exported
    completer = Completer(folder, "m", "cpu", settings=settings_file)
    assert settings_of(completer.model) == (ATT, MLP)
    assert load_plan(settings_file, completer.model.config.model_config()) == completer.model.sparse_plan
    with pytest.raises(ConfigError, match="settings file .* does not exist"):
        serve(folder, settings=tmp_path / "missing.json")


def test_serve_command_takes_settings():
    from dsmoe.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "folder", "--settings", "s.json"])
    assert args.settings == "s.json"
