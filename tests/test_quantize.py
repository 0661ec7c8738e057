"""Weight-only int8 (``dsmoe.inference.quantize``), a module swap: int8 storage, products equal to those of the
dequantized weights (broadcast and plain, eager and compiled), outputs within int8's error of fp32 for every regime
and strategy, only the selected experts' int8 rows read at decode, and compiled decoding equal to eager decoding of
the same int8 model, token for token."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import small_config
from test_decode import CASES, model_for
from torch._dynamo.utils import counters

from dsmoe.inference import quantize as quantize_module
from dsmoe.inference.generate import Decoder, generate
from dsmoe.inference.prepare import prepare
from dsmoe.inference.quantize import Int8Linear, Int8MLPExperts, Int8MoA, int8_values, is_quantized, quantize
from dsmoe.kernels.reference import expert_mlp_reference
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer
from dsmoe.training.checkpoint import write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_int8_values_are_within_half_a_step_of_the_weight():
    w = torch.randn(3, 5, 16)
    for dim in (-1, -2):
        q, scale = int8_values(w, dim)
        assert q.dtype == torch.int8 and q.abs().max() <= 127
        assert scale.shape == (3, 1, 16) if dim == -2 else (3, 5, 1)
        assert ((q.float() * scale - w).abs() <= scale / 2 + 1e-7).all()


def test_quantize_swaps_the_projections_for_int8_and_keeps_routers_norms_and_embeddings():
    model = Transformer(small_config("dsmoe", tie_embeddings=False)).eval()
    fp32 = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model)
    assert is_quantized(model)
    int8 = {k for k, v in model.state_dict().items() if v.dtype == torch.int8}
    stacked = {
        f"blocks.{i}.{name}_int8"
        for i in range(2)
        for name in ("att.wq", "att.wo", "mlp.experts.w_in", "mlp.experts.w_out")
    }
    linears = {f"blocks.{i}.att.{name}.weight" for i in range(2) for name in ("wk", "wv")} | {
        "lm_head.weight"
    }
    assert int8 == stacked | linears  # 2 layers x 6, and the LM head
    block = model.blocks[0]
    assert isinstance(block.att, Int8MoA) and isinstance(block.mlp.experts, Int8MLPExperts)
    assert isinstance(block.att.wk, Int8Linear) and isinstance(model.lm_head, Int8Linear)
    assert block.mlp.router.weight.dtype == torch.float32 and model.embed.weight.dtype == torch.float32
    # contracted dim innermost: w_out [N, F, D] is stored [N, D, F]; the dequantized view is [N, F, D] again
    experts = block.mlp.experts
    assert experts.w_out_int8.shape == (8, 32, 16) and experts.w_out.shape == (8, 16, 32)
    for name, w in (("w_in", experts.w_in), ("w_out", experts.w_out)):  # within half an int8 step
        original = fp32[f"blocks.0.mlp.experts.{name}"]
        assert (w - original).abs().max() <= original.abs().max() / 254 + 1e-7
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model)
    with pytest.raises(ValueError, match="choose one of"):
        quantize(Transformer(small_config()), "int4")


@pytest.mark.parametrize("case", sorted(CASES))
def test_int8_logits_stay_close_to_fp32(case):
    model, plan = model_for(case)
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        fp32 = model(tokens, plan=plan).logits
        int8 = quantize(model)(tokens, plan=plan).logits
    # per-channel int8 rounding of these random weights moves the logits by about 2-3% of their spread at most
    assert (int8 - fp32).abs().max() < 0.06 * fp32.std()
    assert torch.corrcoef(torch.stack([int8.flatten(), fp32.flatten()]))[0, 1] > 0.9999


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_int8_decode_matches_eager_int8_step_by_step(case):
    model, plan = model_for(case)
    quantize(model)
    prompt = torch.randint(0, 97, (1, 5))
    eager, compiled = Decoder(model, 1, 14, plan=plan), Decoder(model, 1, 14, plan=plan, compile=True)
    torch._dynamo.reset()
    counters.clear()
    logits_e, logits_c = eager.prefill(prompt), compiled.prefill(prompt)
    for _ in range(8):
        token = logits_e.argmax(-1)
        assert torch.equal(logits_c.argmax(-1), token)
        logits_e, logits_c = eager.step(token), compiled.step(token)
        torch.testing.assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1


def test_decode_multiplies_only_the_selected_experts_int8_rows(monkeypatch):
    """Batch-1 decode of a top-k DS-MoE: the experts' int8 rows gathered per slot, never the dequantized weights."""
    model, plan = model_for("dsmoe-topk")
    quantize(model)
    dequantized = []
    real = quantize_module._dequantized
    monkeypatch.setattr(
        quantize_module, "_dequantized", lambda m, name, **kw: dequantized.append(name) or real(m, name, **kw)
    )
    decoder = Decoder(model, 1, 8, plan=plan)
    decoder.prefill(torch.randint(0, 97, (1, 3)))
    prefill = set(dequantized)
    dequantized.clear()
    decoder.step(torch.tensor([5]))
    assert (
        "w_in" in prefill
    )  # three prompt tokens x 3 experts > 8 experts: the dequantized weights, through kernels
    assert "w_in" not in dequantized and "w_out" not in dequantized  # one token: the gathered int8 rows


def test_int8_generate_compiled_equals_eager_with_a_padded_batch():
    model, plan = model_for("dsmoe-threshold")
    quantize(model)
    prompt = torch.randint(0, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :3] = False
    eager = generate(model, prompt, 10, prompt_mask_BT=mask, plan=plan)
    assert torch.equal(generate(model, prompt, 10, prompt_mask_BT=mask, plan=plan, compile=True), eager)


@pytest.mark.parametrize("rows", [1, 3, 9])  # the broadcast form (<= 4 rows) and the dequantized product
def test_int8_products_equal_the_products_of_the_dequantized_weights(rows):
    model = Transformer(small_config("dsmoe", tie_embeddings=False)).eval()
    quantize(model)
    experts, att = model.blocks[0].mlp.experts, model.blocks[0].att
    x = torch.randn(rows, 32)
    h = torch.randn(rows, experts.n_experts * experts.d_expert)
    o = torch.randn(rows, att.n_experts * att.n_heads // att.n_experts * att.head_dim)
    wq, wo = att.expert_weights()
    for compiled in (False, True):
        run = torch.compile if compiled else (lambda f: f)
        torch.testing.assert_close(run(experts.up)(x), x @ experts.w_in.flatten(0, 1).T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            run(experts.down)(h), h @ experts.w_out.flatten(0, 1), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(run(att.query)(x), x @ wq.flatten(0, 1).T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run(att.output)(o), o @ wo.flatten(0, 1), rtol=1e-5, atol=1e-5)
        k = run(att.wk)(x)
        torch.testing.assert_close(k, x @ (att.wk.weight.float() * att.wk.scale).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "setting", [SparseSetting("topk", k=3), SparseSetting("threshold", threshold=1.2)], ids=str
)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gathered_int8_experts_equal_the_reference_on_the_dequantized_weights(setting, activation):
    from kernel_cases import make_routing

    model = Transformer(small_config("dsmoe", activation=activation, n_mlp_experts=8)).eval()
    quantize(model)
    experts = model.blocks[0].mlp.experts
    x = torch.randn(2, 32)
    routing = make_routing(2, 8, setting)  # 2 tokens x 8 slots: no more slots than experts, the gathered path
    torch.testing.assert_close(
        experts.sparse(x, routing),
        expert_mlp_reference(x, experts.w_in, experts.w_out, routing, activation),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_quantized_model_is_not_saved(tmp_path):
    model = quantize(Transformer(small_config()))
    with pytest.raises(ValueError, match="quantize it after loading"):
        write_checkpoint(tmp_path / "ckpt", model.state_dict(), model.cfg)
    assert not (tmp_path / "ckpt").exists()


def test_prepare_applies_int8_only_where_it_pays(monkeypatch):
    """On an AVX2 CPU int8 products are slower than fp32 ones: prepare warns and keeps fp32; with AVX-512 it
    quantizes (and decodes compiled)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(UserWarning, match=r"AVX2\) int8 products are slower than fp32"):
        kept = prepare(Transformer(small_config()), quantize="int8")
    assert kept.quantize == "none" and not is_quantized(kept.model) and not kept.compile
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    applied = prepare(Transformer(small_config()), quantize="int8")
    assert applied.quantize == "int8" and is_quantized(applied.model) and applied.compile


@pytest.mark.parametrize("capability", ["avx2", "default", "avx512"])
def test_int8_choice_follows_aten_cpu_capability(capability):
    """The choice reads torch's CPU capability, which ATEN_CPU_CAPABILITY lowers: one machine runs the other's."""
    if capability == "avx512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("needs a CPU with AVX-512 (this one has none, so ATEN_CPU_CAPABILITY cannot raise it)")
    code = "from dsmoe.inference.quantize import int8_pays; print(int8_pays('cpu'), int8_pays('cuda'))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(capability == "avx512"), "True"]
