"""An exported folder whose config.json was edited apart from its weights: one clear error naming the problem, in
``from_pretrained`` of the bundled code (no dsmoe installed), of dsmoe's own class, and in ``dsmoe serve``; an absurd
size is refused before memory is taken; a config that fits still loads."""

import json
import shutil

import pytest
from hf_fixtures import isolated_python

from dsmoe.cli import main
from dsmoe.config import ConfigError
from dsmoe.hf import DSMoEForCausalLM

LOAD = """
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True{extra})
except Exception as err:
    print(type(err).__name__, err)
else:
    print("loaded")
"""
CHANGES = {
    "two more layers": ({"n_layers": 4}, "the config describes a model of"),
    "a million layers": ({"n_layers": 1_000_000}, "but the weights hold"),
    "another expert split": ({"n_mlp_experts": 16, "d_expert": 8}, "the config describes a model of"),
}


def edited_copy(folder, tmp_path, change: dict):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(change)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("case", list(CHANGES))
def test_the_bundled_code_refuses_a_config_that_does_not_fit(exported, tmp_path, case):
    change, message = CHANGES[case]
    folder = edited_copy(exported[1], tmp_path, change)
    child = isolated_python(LOAD.format(folder=str(folder), extra=""), tmp_path, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.startswith(f"ConfigError {folder}: config.json and the weights:"), child.stdout
    assert message in child.stdout and "restore the config written with these weights" in child.stdout


def test_the_bundled_code_refuses_a_structural_keyword_and_loads_a_fitting_folder(exported, tmp_path):
    folder = exported[1]
    child = isolated_python(LOAD.format(folder=str(folder), extra=", n_layers=3"), tmp_path)
    assert "ConfigError" in child.stdout and "the config describes a model of" in child.stdout, child.stderr
    child = isolated_python(LOAD.format(folder=str(folder), extra=", mlp_k=2"), tmp_path)
    assert child.stdout.strip() == "loaded", child.stderr[-3000:]


@pytest.mark.parametrize("case", list(CHANGES))
def test_dsmoe_class_and_serve_refuse_it(exported, tmp_path, case, capsys):
    change, message = CHANGES[case]
    folder = edited_copy(exported[1], tmp_path, change)
    with pytest.raises(ConfigError, match=message):
        DSMoEForCausalLM.from_pretrained(folder)
    assert main(["serve", "--model", str(folder), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: config.json and the weights" in err and message in err


def test_a_structural_keyword_is_checked_before_the_model_is_built(exported):
    with pytest.raises(ConfigError, match="1000000 layers of width 32"):
        DSMoEForCausalLM.from_pretrained(exported[1], n_layers=1_000_000)
    assert DSMoEForCausalLM.from_pretrained(exported[1], mlp_k=2).config.mlp_k == 2


def test_loading_info_is_still_given_when_asked(exported):
    model, info = DSMoEForCausalLM.from_pretrained(exported[1], output_loading_info=True)
    assert isinstance(model, DSMoEForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
