"""oneDNN products (``dsmoe.kernels.onednn``, ``dsmoe.inference.onednn_products``): ``fast_linear`` equal to
``F.linear`` and taken only where it should be; the module swap keeps every weight's name, shape and value; the CPU
expert kernels with oneDNN products equal the reference for every strategy and token count; a prepared model's logits
equal the plain model's; compiled decoding through the opaque op is token for token the plain model's. The tests
lower the size floor (ONEDNN_MIN_WEIGHTS) so that the small test shapes take oneDNN."""

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import SETTING_IDS, SETTINGS, make_routing
from test_decode import CASES, model_for

from dsmoe.inference.generate import Decoder
from dsmoe.inference.onednn_products import OneDNNLinear, OneDNNMLPExperts, OneDNNMoA, use_onednn, uses_onednn
from dsmoe.inference.prepare import prepare
from dsmoe.kernels import cpu, onednn
from dsmoe.kernels.cpu import expert_mlp_cpu
from dsmoe.kernels.reference import expert_mlp_reference
from dsmoe.model.plan import SparsePlan

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="this torch build has no oneDNN (mkldnn)")


@pytest.fixture
def no_size_floor(monkeypatch):
    monkeypatch.setattr(onednn, "ONEDNN_MIN_WEIGHTS", 0)


def test_fast_linear_equals_f_linear_and_is_taken_only_where_it_pays(no_size_floor):
    w = torch.randn(48, 40)
    for x in (torch.randn(1, 40), torch.randn(7, 40), torch.randn(2, 3, 40), torch.randn(300, 40)[::3]):
        assert onednn.onednn_suits(x, w)
        torch.testing.assert_close(onednn.fast_linear(x, w), F.linear(x, w))
    stacked = torch.randn(40, 3 * 48)  # an expert's rows inside a wider matrix: row-strided
    x = torch.randn(5, 48)
    torch.testing.assert_close(onednn.fast_linear(x, stacked[:, 48:96]), F.linear(x, stacked[:, 48:96]))
    # not taken: a strided or transposed weight, bf16, a gradient, or (with the floor back) a small weight
    assert not onednn.onednn_suits(x, stacked[:, 48:96])
    assert not onednn.onednn_suits(torch.randn(5, 48), w.t())
    assert not onednn.onednn_suits(x.bfloat16(), w.bfloat16())
    xg = torch.randn(5, 40, requires_grad=True)
    assert not onednn.onednn_suits(xg, w)
    onednn.fast_linear(xg, w).sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand(5, 40))


def test_the_size_floor_keeps_small_weights_on_torchs_product():
    """From 2^18 weight values with several rows, from 2^19 with one (oneDNN's per-call setup)."""
    assert onednn.ONEDNN_MIN_WEIGHTS == 1 << 18
    assert not onednn.onednn_suits(torch.randn(4, 1024), torch.randn(255, 1024))
    assert onednn.onednn_suits(torch.randn(4, 1024), torch.randn(256, 1024))
    assert not onednn.onednn_suits(torch.randn(1, 1024), torch.randn(256, 1024))
    assert onednn.onednn_suits(torch.randn(1, 1, 1024), torch.randn(512, 1024))


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("n_tokens", [1, 5, 300])
def test_cpu_expert_kernel_with_onednn_products_matches_the_reference(no_size_floor, setting, n_tokens):
    """w_out with [N, D, F] storage (as the swap leaves it): from two tokens up, the per-expert loop multiplies both
    projections through oneDNN; one token keeps its matrix-vector path."""
    torch.manual_seed(0)
    n, f, d = 8, 24, 32
    x = torch.randn(n_tokens, d)
    w_in, w_out = torch.randn(n, f, d) / d**0.5, torch.randn(n, f, d) / f**0.5
    w_out_t = w_out.transpose(1, 2).contiguous().transpose(1, 2)
    routing = make_routing(n_tokens, n, setting)
    for activation in ("gelu", "swiglu"):
        w = torch.randn(n, 2 * f, d) / d**0.5 if activation == "swiglu" else w_in
        expected = expert_mlp_reference(x, w, w_out, routing, activation)
        torch.testing.assert_close(expert_mlp_cpu(x, w, w_out_t, routing, activation), expected)
        torch.testing.assert_close(expert_mlp_cpu(x, w, w_out, routing, activation), expected)


def test_use_onednn_swaps_modules_and_keeps_every_weight(no_size_floor):
    model, _ = model_for("dsmoe-topk")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_onednn(model)
    assert uses_onednn(model)
    block = model.blocks[0]
    assert isinstance(block.mlp.experts, OneDNNMLPExperts) and isinstance(block.att, OneDNNMoA)
    assert isinstance(block.att.wk, OneDNNLinear) and isinstance(model.lm_head, OneDNNLinear)  # tied head
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    w_out = block.mlp.experts.w_out
    assert w_out.shape == (8, 16, 32) and w_out[3].t().is_contiguous()
    assert block.att.wo.flatten(0, 1).t().is_contiguous()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(v.numel() for v in before.values())  # the tied head adds no parameter
    bf16, _ = model_for("dense")
    assert not uses_onednn(use_onednn(bf16.bfloat16()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepared_logits_equal_the_plain_models(no_size_floor, case):
    plain, plan = model_for(case)
    fast, _ = model_for(case)
    prepared = prepare(fast, plan)
    assert uses_onednn(prepared.model)
    assert not uses_onednn(prepare(model_for(case)[0], plan, onednn=False).model)
    assert not uses_onednn(prepare(model_for(case)[0], plan, kernels="reference").model)
    tokens = torch.randint(0, 97, (2, 24))
    with torch.inference_mode():
        expected = plain(tokens, plan=plan).logits
        torch.testing.assert_close(prepared.model(tokens, plan=prepared.plan).logits, expected)


@pytest.mark.parametrize("case", ["dense", "dsmoe-threshold", "dsmoe-topk"])
def test_compiled_onednn_decode_is_the_plain_models_token_for_token(no_size_floor, case):
    plain, plan = model_for(case)
    prepared = prepare(model_for(case)[0], plan)
    prompt = torch.randint(0, 97, (2, 5))
    expected = Decoder(plain, 2, 16, plan=plan)
    compiled = Decoder(prepared.model, 2, 16, plan=prepared.plan, compile=True)
    logits_e, logits_c = expected.prefill(prompt), compiled.prefill(prompt)
    for _ in range(8):
        torch.testing.assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-4)
        token = logits_e.argmax(-1)
        assert torch.equal(logits_c.argmax(-1), token)
        logits_e, logits_c = expected.step(token), compiled.step(token)


packing = pytest.mark.skipif(not onednn.PACKING, reason="this torch build has no oneDNN weight packing")


def zero_packed_lists(module, *names: str) -> None:
    """Replace each packed weight in the lists ``names`` of ``module`` (where it has them) by packed zeros."""
    for name in names:
        if getattr(module, name, None) is not None:
            setattr(module, name, [onednn.pack(torch.zeros(p.shape)) for p in getattr(module, name)])


@packing
def test_packed_products_equal_f_linear():
    w = torch.randn(48, 40)
    packed = onednn.pack(w)
    for x in (torch.randn(1, 40), torch.randn(7, 40), torch.randn(300, 40)):
        torch.testing.assert_close(onednn.packed_linear(x, packed), F.linear(x, w))


@packing
@pytest.mark.parametrize("case", sorted(CASES))
def test_prepacked_models_compute_the_plain_models_logits_and_keep_their_weights(no_size_floor, case):
    """Batched forwards (prefill of two prompts, decode of a batch) read the packed copies; one row and compiled
    graphs the plain weights; the state dict is unchanged."""
    plain, plan = model_for(case)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    prepared = prepare(model_for(case)[0], plan, prepack=True)
    assert prepared.prepacked and not prepare(model_for(case)[0], plan).prepacked
    block = prepared.model.blocks[0]
    assert block.att.wk.packed is not None and block.att.packed_q is not None
    after = prepared.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    tokens = torch.randint(0, 97, (2, 24))
    with torch.inference_mode():
        torch.testing.assert_close(
            prepared.model(tokens, plan=prepared.plan).logits, plain(tokens, plan=plan).logits
        )
    eager = Decoder(plain, 3, 16, plan=plan)
    packed = Decoder(prepared.model, 3, 16, plan=prepared.plan)
    compiled = Decoder(prepared.model, 3, 16, plan=prepared.plan, compile=True)
    prompt = torch.randint(0, 97, (3, 5))
    logits = [d.prefill(prompt) for d in (eager, packed, compiled)]
    for _ in range(4):
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[2], logits[0], rtol=1e-4, atol=1e-4)
        token = logits[0].argmax(-1)
        logits = [d.step(token) for d in (eager, packed, compiled)]
    # the packed copies are what batched forwards read: zeroed, they change the logits; one row does not read them
    for m in prepared.model.modules():
        for name in ("packed", "packed_q", "packed_o"):
            if getattr(m, name, None) is not None:
                setattr(m, name, onednn.pack(torch.zeros(getattr(m, name).shape)))
        zero_packed_lists(m, "packed_in", "packed_out", "packed_q_experts", "packed_o_experts")
    with torch.inference_mode():
        assert not torch.allclose(
            prepared.model(tokens, plan=prepared.plan).logits, plain(tokens, plan=plan).logits
        )
        one = tokens[:1, :1]
        torch.testing.assert_close(
            prepared.model(one, plan=prepared.plan).logits, plain(one, plan=plan).logits
        )


@packing
def test_prepack_is_refused_or_reported_where_it_does_not_apply():
    model, plan = model_for("dense")
    with pytest.raises(ValueError, match="needs onednn=True"):
        prepare(model, plan, onednn=False, prepack=True)
    with pytest.warns(UserWarning, match="nothing was packed"):
        assert not prepare(model, plan, dtype=torch.bfloat16, prepack=True).prepacked
    small, _ = model_for("dense")  # every weight below oneDNN's size floor: none is packed
    with pytest.warns(UserWarning, match="nothing was packed"):
        assert not prepare(small, plan, prepack=True).prepacked


@packing
def test_with_a_gradient_the_plain_weights_are_read(no_size_floor):
    """The packed op has no backward: where a gradient is wanted, products read the weights themselves."""
    model, plan = model_for("dsmoe-topk")
    prepared = prepare(model, plan, prepack=True)
    assert prepared.prepacked
    prepared.model(torch.randint(0, 97, (2, 8)), plan=prepared.plan).logits.sum().backward()
    block = prepared.model.blocks[0]
    assert block.att.wk.weight.grad is not None and block.mlp.experts.w_in.grad is not None


@packing
@pytest.mark.parametrize("case", ["dsmoe-topk", "dsmoe-threshold"])
def test_sparse_attention_of_many_tokens_reads_each_experts_packed_rows(no_size_floor, monkeypatch, case):
    """A prefill with many pairs per attention expert multiplies each selected expert's packed query and output rows
    (``moa_packed``): equal to the plain model's, and changed when those copies (and only those) are zeroed."""
    monkeypatch.setattr(cpu, "ATTENTION_LOOP_PAIRS_PER_EXPERT", 4)
    plain, plan = model_for(case)
    prepared = prepare(model_for(case)[0], plan, prepack=True)
    att = prepared.model.blocks[0].att
    assert isinstance(att, OneDNNMoA) and len(att.packed_q_experts) == att.n_experts
    tokens = torch.randint(0, 97, (2, 24))
    with torch.inference_mode():
        expected = plain(tokens, plan=plan).logits
        torch.testing.assert_close(prepared.model(tokens, plan=prepared.plan).logits, expected)
        for block in prepared.model.blocks:
            zero_packed_lists(block.att, "packed_q_experts", "packed_o_experts")
        assert not torch.allclose(prepared.model(tokens, plan=prepared.plan).logits, expected)
        dense_attention = SparsePlan.build(plain.cfg, None, CASES[case][2])  # reads the whole packed W_q, W_o
        torch.testing.assert_close(
            prepared.model(tokens, plan=dense_attention).logits, plain(tokens, plan=dense_attention).logits
        )
        one = tokens[:1, :1]
        torch.testing.assert_close(
            prepared.model(one, plan=prepared.plan).logits, plain(one, plan=plan).logits
        )
