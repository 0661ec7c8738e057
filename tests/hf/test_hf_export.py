"""`dsmoe export`: the folder loads with trust_remote_code in a process that has never imported dsmoe, and its
generate() / pipeline() agree token for token with dsmoe's own generate, batched over prompts of different lengths
as one at a time."""

import json

import pytest
import torch
from hf_fixtures import isolated_python

from dsmoe.cli import main
from dsmoe.hf.bundle import MODELING_FILE, bundle_source
from dsmoe.inference.generate import generate
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.training.checkpoint import load_pretrained

CHILD = """
import json
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
folder, prompt = {folder!r}, {prompt!r}
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = tokenizer(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
out = model.generate(ids, max_new_tokens=12, do_sample=False)
compiled = model.compiled_generate(ids, 12)  # dsmoe's compiled decode step, bundled into the folder's code
pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
text = pipe(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
prompts = [prompt, "A dog"]  # different lengths: batched, the shorter one is left-padded
batched = [o[0]["generated_text"] for o in pipe(prompts, batch_size=2, max_new_tokens=12, do_sample=False,
                                                 return_full_text=False)]
alone = [pipe(p, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"] for p in prompts]
print("RESULT", json.dumps({{"module": type(model).__module__, "ids": ids.tolist(), "logits": logits.tolist(),
                  "generated": out.tolist(), "compiled": compiled.tolist(), "pipeline_text": text, "mlp_k": model.config.mlp_k,
                  "batched": batched, "alone": alone}}))
"""


def test_exported_folder_loads_without_dsmoe_and_matches_native(exported, tmp_path):
    checkpoint, folder = exported
    prompt = "The old man crosses the bridge. A dog"
    child = isolated_python(CHILD.format(folder=str(folder), prompt=prompt), tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.split("RESULT", 1)[1])
    assert result["module"].startswith("transformers_modules.") and result["mlp_k"] == 3

    native, tokenizer = load_pretrained(checkpoint)
    plan = SparsePlan.build(native.cfg, mlp=SparseSetting("topk", k=3))
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    assert result["ids"] == ids.tolist()
    with torch.no_grad():
        logits = native(ids, plan=plan).logits
        torch.testing.assert_close(torch.tensor(result["logits"]), logits, rtol=1e-5, atol=1e-5)
    eos = tokenizer.token_to_id("<|endoftext|>")
    expected = generate(native, ids, 12, eos_token_id=eos, plan=plan)[0].tolist()
    assert result["generated"][0] == expected
    assert result["compiled"][0] == expected
    assert result["pipeline_text"] == tokenizer.decode(expected[ids.shape[1] :])
    assert result["batched"] == result["alone"]


def test_the_tokenizer_loads_without_a_question_or_a_warning(exported, tmp_path):
    """transformers' AutoTokenizer reads config.json through AutoConfig first, and a config that needs custom code
    makes it ask "[y/N]" unless trust_remote_code is given (transformers 5.4 to 5.24): these are the two ways that
    load the exported tokenizer silently, with standard input closed."""
    _, folder = exported
    script = (
        "from transformers import AutoTokenizer, PreTrainedTokenizerFast\n"
        f"a = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        f"b = PreTrainedTokenizerFast.from_pretrained({str(folder)!r})\n"
        "assert a('A dog').input_ids == b('A dog').input_ids and a.padding_side == b.padding_side == 'left'\n"
    )
    child = isolated_python(script, tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout == "" and child.stderr == ""


def test_exported_code_is_generated_from_the_package(exported):
    _, folder = exported
    assert (folder / MODELING_FILE).read_text() == bundle_source()
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling_dsmoe.DSMoEConfig",
        "AutoModelForCausalLM": "modeling_dsmoe.DSMoEForCausalLM",
    }
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]


def test_export_refuses_to_overwrite_and_needs_a_tokenizer(exported, tmp_path, capsys):
    checkpoint, folder = exported
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(folder)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    (checkpoint.parent / "bare").mkdir()
    bare = checkpoint.parent / "bare" / "checkpoint"
    native, _ = load_pretrained(checkpoint)
    from dsmoe.training.checkpoint import write_checkpoint

    write_checkpoint(bare, native.state_dict(), native.cfg)
    assert main(["export", "--checkpoint", str(bare), "--out", str(tmp_path / "x")]) == 2
    assert "has no tokenizer.json; pass --tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_checks_its_arguments_before_loading_weights(exported, tmp_path, monkeypatch, capsys):
    from dsmoe.training import checkpoint as ckpt

    monkeypatch.setattr(ckpt, "load_model_state", lambda *a, **k: pytest.fail("weights loaded"))
    checkpoint, _ = exported
    export = ["export", "--checkpoint", str(checkpoint), "--out"]
    assert main([*export, str(tmp_path / "a"), "--strategy", "topk", "--k", "9"]) == 2
    assert (
        "mlp: strategy 'topk' needs an integer k in 1..8 (the layer's 8 experts), got k=9"
        in capsys.readouterr().err
    )
    assert main([*export, str(tmp_path / "a"), "--tokenizer", str(tmp_path / "missing.json")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([*export, str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "a")]) == 2
    assert "not a dsmoe checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
