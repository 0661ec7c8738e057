"""The vLLM model in vLLM itself (the CPU build in .venv-vllm; ``make test-vllm``): exported folders served by
``vllm.LLM`` give, token for token, what dsmoe's own ``generate`` gives from the checkpoint, under every sparse
setting, with prompts of different lengths scheduled together in one batch."""

from __future__ import annotations

import json

import pytest
from vllm_fixtures import MAX_NEW, PROMPTS, export_folder, native_tokens, vllm_engine

from dsmoe.model.settings import SparseSetting

pytestmark = pytest.mark.vllm

SETTINGS = {
    "as-trained": (None, None),
    "topk": (SparseSetting("topk", k=2), SparseSetting("topk", k=3)),
    "threshold": (SparseSetting("threshold", threshold=1.0), SparseSetting("threshold", threshold=1.2)),
}


def vllm_tokens(llm, prompts: list[list[int]]) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.parametrize("name", SETTINGS)
def test_ds_moe_in_vllm_matches_native_generate(tmp_path_factory, name):
    att, mlp = SETTINGS[name]
    checkpoint, folder = export_folder(tmp_path_factory, "dsmoe", att=att, mlp=mlp)
    expected = native_tokens(checkpoint, PROMPTS, att=att, mlp=mlp)
    if att or mlp:  # the setting changes what the model says, so vLLM must have applied it
        assert expected != native_tokens(checkpoint, PROMPTS)
    with vllm_engine(folder) as llm:
        assert vllm_tokens(llm, PROMPTS) == expected


def test_per_layer_settings_from_config_json(tmp_path_factory):
    """One setting per layer in config.json, here given through vLLM's hf_overrides (what a user passes to change
    an exported folder's settings without re-exporting)."""
    checkpoint, folder = export_folder(tmp_path_factory, "dsmoe")
    overrides = {
        "att_strategy": ["topk", None],
        "att_k": [1, None],
        "mlp_strategy": ["threshold", "topk"],
        "mlp_threshold": [0.8, None],
        "mlp_k": [None, 2],
    }
    att = [SparseSetting("topk", k=1), None]
    mlp = [SparseSetting("threshold", threshold=0.8), SparseSetting("topk", k=2)]
    expected = native_tokens(checkpoint, PROMPTS, att=att, mlp=mlp)
    assert expected != native_tokens(checkpoint, PROMPTS)
    with vllm_engine(folder, hf_overrides=overrides) as llm:
        assert vllm_tokens(llm, PROMPTS) == expected


def test_a_settings_file_exported_into_config_json(tmp_path_factory, tmp_path):
    """What ``dsmoe tune`` writes, through ``dsmoe export --settings``, is what vLLM serves."""
    from dsmoe.model.plan import SparsePlan
    from dsmoe.model.settings_file import load_plan, plan_to_dict
    from dsmoe.training.checkpoint import checkpoint_config

    att = [SparseSetting("threshold", threshold=1.1), SparseSetting("topk", k=3)]
    mlp = [SparseSetting("topk", k=1), SparseSetting("threshold", threshold=0.9)]
    checkpoint, _ = export_folder(tmp_path_factory, "dsmoe")
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(plan_to_dict(SparsePlan.build(checkpoint_config(checkpoint), att, mlp))))
    plan = load_plan(path, checkpoint_config(checkpoint))
    att, mlp = list(plan.att), list(plan.mlp)
    _, folder = export_folder(tmp_path_factory, "dsmoe", att=att, mlp=mlp)
    expected = native_tokens(checkpoint, PROMPTS, att=att, mlp=mlp)
    assert expected != native_tokens(checkpoint, PROMPTS)
    with vllm_engine(folder) as llm:
        assert vllm_tokens(llm, PROMPTS) == expected


def test_threshold_topk_one_prompt(tmp_path_factory):
    """threshold_topk's K is the mean count over the tokens processed together, so it depends on the batch by
    definition; one prompt at a time, vLLM and dsmoe process the same tokens together."""
    mlp = SparseSetting("threshold_topk", threshold=1.0)
    checkpoint, folder = export_folder(tmp_path_factory, "dsmoe", mlp=mlp)
    with vllm_engine(folder) as llm:
        for prompt in PROMPTS[:2]:
            assert vllm_tokens(llm, [prompt]) == native_tokens(checkpoint, [prompt], mlp=mlp)


@pytest.mark.parametrize("regime", ["smoe", "dense"])
def test_smoe_and_dense_in_vllm_match_native_generate(tmp_path_factory, regime):
    checkpoint, folder = export_folder(tmp_path_factory, regime)
    with vllm_engine(folder) as llm:
        assert vllm_tokens(llm, PROMPTS) == native_tokens(checkpoint, PROMPTS)


def router_dtypes(model) -> list[str]:
    return sorted({str(p.dtype) for n, p in model.named_parameters() if n.endswith("router.weight")})


def test_the_readme_default_keeps_the_exports_float32_and_its_tokens(tmp_path_factory, monkeypatch):
    """``LLM(model=export, trust_remote_code=True)``, no dtype: vLLM's 'auto' would downcast the float32 export to
    bfloat16; dsmoe's plugin keeps float32, so vLLM gives the Hugging Face model's greedy tokens."""
    import torch

    mlp = SparseSetting("threshold", threshold=1.0)
    checkpoint, folder = export_folder(tmp_path_factory, "dsmoe", mlp=mlp)
    with vllm_engine(folder, dtype=None) as llm:
        assert llm.llm_engine.model_config.dtype == torch.float32
        assert vllm_tokens(llm, PROMPTS) == native_tokens(checkpoint, PROMPTS, mlp=mlp)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the engine
    with vllm_engine(folder, dtype="bfloat16") as llm:  # asked for explicitly: vLLM's choice stands
        assert llm.llm_engine.model_config.dtype == torch.bfloat16
        # ... but the routers stay float32, as in dsmoe's bf16 training, so thresholds see unrounded scores
        routers = llm.apply_model(router_dtypes)
        assert routers == [["torch.float32"]]
        assert len(vllm_tokens(llm, PROMPTS)) == len(PROMPTS)


def test_the_plugin_registers_the_architecture():
    from vllm import ModelRegistry

    from dsmoe.hf.vllm_plugin import ARCHITECTURE, register

    register()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


@pytest.mark.parametrize("n_layers", [4, 1_000_000])
def test_a_config_that_does_not_fit_the_weights_is_refused(tmp_path_factory, tmp_path, capfd, n_layers):
    """config.json edited apart from the weights: vLLM's engine does not start, and the error names the problem
    (for a million layers before vLLM allocates them)."""
    import shutil

    _, folder = export_folder(tmp_path_factory, "dsmoe")
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    config = json.loads((edited / "config.json").read_text())
    config["n_layers"] = n_layers
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception) as err, vllm_engine(edited):
        pass
    out, said = capfd.readouterr()
    said = str(err.value) + out + said
    assert "config.json and the weights: the config describes a model of" in said, said[-3000:]
