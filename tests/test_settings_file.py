"""The per-layer sparse-settings file: written, read back, and every bad file refused with an error that names the
problem (torch-free: the command line reads it before any weight loads)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import small_config

from dsmoe.config import ConfigError
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.model.settings_file import load_plan, plan_from_dict, plan_to_dict

CFG = small_config(n_layers=3)  # 4 attention experts, 8 MLP experts
ATT = [SparseSetting("threshold", threshold=0.5), None, SparseSetting("dense")]
MLP = [
    SparseSetting("topk", k=3),
    SparseSetting("threshold_topk", threshold=1.25),
    SparseSetting("threshold", threshold=2.0),
]


def write(tmp_path, data):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_round_trip_through_the_file(tmp_path):
    path = write(tmp_path, plan_to_dict(SparsePlan.build(CFG, ATT, MLP), {"made_by": "test"}))
    plan = load_plan(path, CFG)
    assert list(plan.att) == ATT and list(plan.mlp) == MLP


def test_one_entry_applies_to_every_layer_and_normalize_is_carried(tmp_path):
    data = {"att": None, "mlp": {"strategy": "threshold", "threshold": 1.0}, "normalize": True}
    plan = load_plan(write(tmp_path, data), CFG)
    assert list(plan.att) == [None] * 3
    assert list(plan.mlp) == [SparseSetting("threshold", threshold=1.0, normalize=True)] * 3


def test_config_json_encoding_reads_back_through_the_hf_config():
    pytest.importorskip("transformers", reason="the Hugging Face config is in the 'hf' extra")
    from dsmoe.hf.configuration import DSMoEConfig

    fields = SparsePlan.build(CFG, ATT, MLP).fields()
    assert fields["mlp_k"] == [3, None, None] and fields["att_strategy"] == ["threshold", None, "dense"]
    config = DSMoEConfig.from_model_config(CFG, **json.loads(json.dumps(fields)))  # as config.json stores it
    plan = config.plan()
    assert list(plan.att) == ATT and list(plan.mlp) == MLP


@pytest.mark.parametrize(
    "data, message",
    [
        ({"att": [None, None], "mlp": None}, "has 2 entries for a model with 3 layers"),
        ({"n_layers": 4, "att": None, "mlp": None}, "made for a model of 4 layers; this model has 3"),
        ({"mlp": {"strategy": "top2"}}, "unknown sparse strategy 'top2'"),
        ({"mlp": {"strategy": "topk", "k": 9}}, "integer k in 1..8"),
        ({"att": {"strategy": "topk", "k": 5}}, "integer k in 1..4"),
        ({"mlp": {"strategy": "topk", "k": 2.5}}, "integer k in 1..8"),
        ({"mlp": {"strategy": "threshold", "threshold": 0}}, "threshold in (0, 8]"),
        ({"mlp": {"strategy": "threshold", "threshold": 9.0}}, "threshold in (0, 8]"),
        ({"mlp": {"strategy": "threshold", "threshold": "1"}}, "threshold in (0, 8]"),
        ({"mlp": {"strategy": "threshold", "threshold": 1.0, "k": 2}}, "k is read by strategy 'topk' only"),
        ({"mlp": {"strategy": "topk", "k": 2, "eps": 1}}, "unknown key(s) eps"),
        ({"mlp": None, "layers": []}, "unknown key(s) layers"),
        ({"format": "other"}, "expected 'dsmoe-sparse-settings'"),
        ({"version": 2, "mlp": None}, "version 2 is not understood"),
        ({"normalize": "yes", "mlp": None}, "normalize must be true or false"),
        ({}, "neither 'att' nor 'mlp'"),
        ({"mlp": "threshold"}, "'mlp' must be a list"),
        ({"mlp": [None, 3, None]}, "mlp layer 1: expected an object"),
    ],
)
def test_bad_files_get_one_clear_error(tmp_path, data, message):
    with pytest.raises(ConfigError) as err:
        load_plan(write(tmp_path, data), CFG)
    assert message in str(err.value)
    assert "settings.json" in str(err.value)


def test_unreadable_or_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_plan(write(tmp_path, "{not json"), CFG)
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_plan(write(tmp_path, "[1, 2]"), CFG)
    with pytest.raises(ConfigError, match="does not exist; write one with `dsmoe tune"):
        load_plan(tmp_path / "missing.json", CFG)


def test_the_error_names_the_layer():
    with pytest.raises(ConfigError, match=r"f: mlp layer 2: unknown sparse strategy 'x'"):
        plan_from_dict({"mlp": [None, None, {"strategy": "x"}]}, CFG, where="f")


def test_reading_imports_no_torch(tmp_path):
    path = write(tmp_path, plan_to_dict(SparsePlan.build(CFG, ATT, MLP)))
    code = (
        "import sys; from helpers import small_config; from dsmoe.model.settings_file import load_plan; "
        f"load_plan({str(path)!r}, small_config(n_layers=3)); assert 'torch' not in sys.modules"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent
    )
    assert proc.returncode == 0, proc.stderr
