"""Weight-only int8 (``dsmoe.inference.quantize``): int8 storage, outputs within int8's error of fp32 for every
regime and strategy, and the compiled decode step's int8 fast paths (broadcast products, gathered experts) equal to
eager decoding of the same int8 model, token for token."""

import pytest
import torch
from helpers import small_config
from test_decode import CASES, model_for
from torch._dynamo.utils import counters

from dsmoe.inference.generate import Decoder, generate
from dsmoe.inference.quantize import int8_values, is_quantized, quantize, quantized_weights
from dsmoe.kernels.gathered import expert_mlp_gathered
from dsmoe.kernels.reference import expert_mlp_reference
from dsmoe.model.products import times, times_rows
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


def test_quantize_stores_projections_as_int8_and_keeps_routers_norms_and_embeddings():
    model = Transformer(small_config("dsmoe", tie_embeddings=False)).eval()
    quantize(model)
    assert is_quantized(model)
    int8 = {k for k, v in model.state_dict().items() if v.dtype == torch.int8}
    names = {"w_in", "w_out", "wq", "wo", "wk.weight", "wv.weight"}
    assert len(int8) == len(quantized_weights(model)) == 2 * 6 + 1  # 2 layers x 6, the LM head
    assert all(any(n.split(".")[0] in k for n in names) or k.startswith("lm_head") for k in int8)
    assert model.blocks[0].mlp.router.weight.dtype == torch.float32
    assert model.embed.weight.dtype == torch.float32
    # contracted dim innermost: w_out [N, F, D] is stored [N, D, F] and read back as [N, F, D]
    experts = model.blocks[0].mlp.experts
    assert experts.parametrizations.w_out.original.shape == (8, 32, 16) and experts.w_out.shape == (8, 16, 32)
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


def test_compiled_int8_decode_takes_the_int8_paths(monkeypatch):
    """Batch 1 decode of a top-k DS-MoE: the experts through expert_mlp_gathered, the projections in broadcast form."""
    import dsmoe.model.experts as experts_module
    import dsmoe.model.products as products

    traced = []

    def gathered(*args):
        traced.append("experts")
        return expert_mlp_gathered(*args)

    monkeypatch.setattr(experts_module, "expert_mlp_gathered", gathered)
    model, plan = model_for("dsmoe-topk")
    quantize(model)
    torch._dynamo.reset()
    decoder = Decoder(model, 1, 8, plan=plan, compile=True)
    decoder.prefill(torch.randint(0, 97, (1, 3)))
    decoder.step(torch.tensor([5]))
    assert "experts" in traced
    assert products._reads_int8(model.blocks[0].att, "wq", 1) is False  # outside a compiled graph: never


def test_int8_generate_compiled_equals_eager_with_a_padded_batch():
    model, plan = model_for("dsmoe-threshold")
    quantize(model)
    prompt = torch.randint(0, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :3] = False
    eager = generate(model, prompt, 10, prompt_mask_BT=mask, plan=plan)
    assert torch.equal(generate(model, prompt, 10, prompt_mask_BT=mask, plan=plan, compile=True), eager)


def test_broadcast_products_equal_the_plain_products_under_compile():
    model = Transformer(small_config("dsmoe")).eval()
    quantize(model)
    experts, att = model.blocks[0].mlp.experts, model.blocks[0].att
    x = torch.randn(2, 32)
    h = torch.randn(2, experts.w_out.shape[0] * experts.w_out.shape[1])
    compiled = torch.compile(lambda x, h: (times_rows(x, experts, "w_in"), times(h, experts, "w_out")))
    up, down = compiled(x, h)
    torch.testing.assert_close(up, x @ experts.w_in.flatten(0, 1).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(down, h @ experts.w_out.flatten(0, 1), rtol=1e-5, atol=1e-5)
    k = torch.compile(lambda x: times_rows(x, att.wk, "weight"))(x[:, None])
    torch.testing.assert_close(k, x[:, None] @ att.wk.weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "setting", [SparseSetting("topk", k=3), SparseSetting("threshold", threshold=1.2)], ids=str
)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gathered_expert_mlp_equals_the_reference(setting, activation):
    from kernel_cases import make_routing, mlp_inputs

    x, w_in, w_out = mlp_inputs(3, 8, 16, 12, activation, torch.float32)
    routing = make_routing(3, 8, setting)
    torch.testing.assert_close(
        expert_mlp_gathered(x, w_in, w_out, routing, activation),
        expert_mlp_reference(x, w_in, w_out, routing, activation),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_quantized_model_is_not_saved(tmp_path):
    model = quantize(Transformer(small_config()))
    with pytest.raises(ValueError, match="quantize it after loading"):
        write_checkpoint(tmp_path / "ckpt", model.state_dict(), model.cfg)
    assert not (tmp_path / "ckpt").exists()
