"""The kernels as torch.library custom ops (checked by opcheck, fake implementations included), the differentiable
grouped path SMoE trains through (forward and backward against the reference), and a sparse decode step that
compiles to one graph and computes what eager computes."""

import dataclasses

import pytest
import torch
from helpers import small_config
from kernel_cases import SETTING_IDS, SETTINGS, make_routing, mlp_inputs, moa_inputs

from dsmoe import kernels
from dsmoe.kernels.reference import expert_mlp_reference, moa_reference
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import Kernels, SparseSetting
from dsmoe.model.transformer import Transformer

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def routing_tensors(r):
    return r.indices, r.weights, r.mask, r.all_valid


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_expert_mlp_op_passes_opcheck_and_matches_reference(setting, n_tokens):
    x, w_in, w_out = mlp_inputs(n_tokens, 4, 32, 16, "swiglu", torch.float32)
    routing = make_routing(n_tokens, 4, setting)
    args = (x, w_in, w_out, *routing_tensors(routing), "swiglu", "cpu")
    torch.library.opcheck(torch.ops.dsmoe.expert_mlp.default, args)
    out = torch.ops.dsmoe.expert_mlp(*args)
    torch.testing.assert_close(
        out, expert_mlp_reference(x, w_in, w_out, routing, "swiglu"), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("new_tokens, cached", [(1, 3), (4, 0)])
@pytest.mark.parametrize(
    "path", ["cpu", "sorted_static"]
)  # sorted_static: a CUDA graph's (dsmoe.kernels.static)
def test_moa_op_passes_opcheck_and_matches_reference(setting, new_tokens, cached, path):
    x, wq, wo, c = moa_inputs(2, new_tokens, cached, 4, 2, 8, 2, 32, torch.float32)
    routing = make_routing(2 * new_tokens, 4, setting)
    batch_major = True  # moa_inputs lays the tokens out as MoA.forward does
    context = (c.k_BHSd, c.v_BHSd, c.batch_T, c.pos_T, c.cos_Sd, c.sin_Sd, None, batch_major)
    args = (x, wq, wo, *routing_tensors(routing), *context, path)
    torch.library.opcheck(torch.ops.dsmoe.moa.default, args)
    ref = moa_reference(x, wq, wo, routing, c)
    torch.testing.assert_close(torch.ops.dsmoe.moa(*args), ref, rtol=1e-4, atol=1e-5)


def grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_training_path_matches_reference_forward_and_backward(setting, activation):
    x, w_in, w_out = mlp_inputs(12, 4, 32, 16, activation, torch.float32)
    routing = make_routing(12, 4, setting)
    weights = routing.weights

    def with_weights(impl):
        def run(x, w_in, w_out, weights):
            r = type(routing)(routing.indices, weights, routing.mask, routing.n_experts, routing.all_valid)
            return impl(x, w_in, w_out, r, activation)

        return run

    assert kernels.implementation(Kernels(), x, needs_grad=True) == "grouped"
    out, g = grads(with_weights(kernels.expert_mlp), [x, w_in, w_out, weights])
    ref, g_ref = grads(with_weights(expert_mlp_reference), [x, w_in, w_out, weights])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "w_in", "w_out", "weights"), g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("setting", [SparseSetting("topk", k=2), SparseSetting("threshold", threshold=1.0)])
def test_grouped_attention_path_matches_reference_forward_and_backward(setting):
    x, wq, wo, ctx = moa_inputs(2, 5, 0, 4, 2, 8, 2, 32, torch.float32)
    k, v = ctx.k_BHSd, ctx.v_BHSd
    routing = make_routing(10, 4, setting)

    def run(impl):
        return lambda x, wq, wo, k, v: impl(x, wq, wo, routing, dataclasses.replace(ctx, k_BHSd=k, v_BHSd=v))

    out, g = grads(run(kernels.moa), [x, wq, wo, k, v])
    ref, g_ref = grads(run(moa_reference), [x, wq, wo, k, v])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(("x", "wq", "wo", "k", "v"), g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "setting",
    [SparseSetting("topk", k=2), SparseSetting("threshold", threshold=1.0)],
    ids=["topk", "threshold"],
)
def test_sparse_decode_step_compiles_to_one_graph_and_matches_eager(setting):
    torch.manual_seed(0)
    model = Transformer(small_config("dsmoe", n_mlp_experts=8)).eval()
    plan = SparsePlan.build(model.cfg, setting, setting)
    prompt = torch.randint(0, 97, (2, 6))

    def decode_step(token_B1, cache, pos):
        compiling = torch.compiler.is_compiling()  # the caller's job: it knows whether it compiles
        step_plan = plan.with_kernels(compiled=compiling)
        return model(token_B1, plan=step_plan, cache=cache, start_pos=pos, last_only=True).logits

    def run(step):
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            model(prompt, plan=plan, cache=cache)
            token = prompt[:, -1:]
            logits = [step(token, cache, 6), step(token + 1, cache, 7)]
        return torch.stack(logits), cache

    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(decode_step)(prompt[:, -1:], model.new_cache(2, 16), 6)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    eager, eager_cache = run(decode_step)
    compiled, compiled_cache = run(torch.compile(decode_step, fullgraph=True, backend="inductor"))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_cache.k, eager_cache.k, rtol=1e-5, atol=1e-6)  # lists: layer by layer


@pytest.mark.parametrize("rows", [(3, 0, 5), (4, 4, 4)])
def test_grouped_mm_op_passes_opcheck_forward_and_backward(rows):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(sum(rows), 16, generator=g, requires_grad=True)
    b = torch.randn(len(rows), 16, 32, generator=g, requires_grad=True)
    offs = torch.tensor(rows).cumsum(0).to(torch.int32)
    torch.library.opcheck(torch.ops.dsmoe.grouped_mm.default, (a, b, offs))
    out, (ga, gb) = grads(lambda a, b: torch.ops.dsmoe.grouped_mm(a, b, offs), [a, b])

    def loop(a, b):
        starts = [0, *offs.tolist()[:-1]]
        return torch.cat([a[s:e] @ b[i] for i, (s, e) in enumerate(zip(starts, offs.tolist(), strict=True))])

    ref, (ra, rb) = grads(loop, [a, b])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)
