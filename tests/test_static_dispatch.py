"""The static-shape sorted dispatch (``dsmoe.kernels.static``) that a CUDA-graph-captured decode step takes for
variable-K routings: it equals the reference for every strategy, and compiles as one graph without breaks
(``fullgraph``), so it has no data-dependent shape and no host sync."""

import dataclasses

import pytest
import torch
from kernel_cases import SETTING_IDS, SETTINGS, make_routing, mlp_inputs, moa_inputs, tolerances

from dsmoe.kernels import _graph_path
from dsmoe.kernels.reference import expert_mlp_reference, moa_reference
from dsmoe.kernels.static import expert_mlp_static, moa_static
from dsmoe.model.settings import SparseSetting

THRESHOLD = SparseSetting("threshold", threshold=1.0)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_static_expert_mlp_equals_the_reference(setting, activation):
    x, w_in, w_out = mlp_inputs(12, 8, 32, 16, activation, torch.float32)
    routing = make_routing(12, 8, setting)
    expected = expert_mlp_reference(x, w_in, w_out, routing, activation)
    torch.testing.assert_close(
        expert_mlp_static(x, w_in, w_out, routing, activation), expected, **tolerances(torch.float32)
    )


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_static_moa_equals_the_reference(setting):
    x, wq, wo, ctx = moa_inputs(3, 1, 5, 4, 2, 8, 2, 32, torch.float32)
    ctx = dataclasses.replace(ctx, batch_major=True)
    routing = make_routing(3, 4, setting)
    expected = moa_reference(x, wq, wo, routing, ctx)
    torch.testing.assert_close(moa_static(x, wq, wo, routing, ctx), expected, **tolerances(torch.float32))


def test_static_dispatch_of_a_threshold_routing_compiles_without_a_graph_break():
    torch._dynamo.reset()
    routing = make_routing(6, 8, THRESHOLD)
    x, w_in, w_out = mlp_inputs(6, 8, 32, 16, "swiglu", torch.float32)
    mlp = torch.compile(expert_mlp_static, fullgraph=True, dynamic=False)
    torch.testing.assert_close(
        mlp(x, w_in, w_out, routing, "swiglu"),
        expert_mlp_reference(x, w_in, w_out, routing, "swiglu"),
        **tolerances(torch.float32),
    )
    x, wq, wo, ctx = moa_inputs(6, 1, 5, 8, 2, 8, 2, 32, torch.float32)
    ctx = dataclasses.replace(ctx, batch_major=True)
    moa = torch.compile(moa_static, fullgraph=True, dynamic=False)
    torch.testing.assert_close(
        moa(x, wq, wo, routing, ctx), moa_reference(x, wq, wo, routing, ctx), **tolerances(torch.float32)
    )


def test_only_a_cuda_variable_k_routing_takes_the_static_path():
    threshold = make_routing(4, 8, THRESHOLD)
    top_k = make_routing(4, 8, SETTINGS[1])
    cpu = torch.zeros(1)
    assert _graph_path("sorted", cpu, threshold) == "sorted"  # the CPU keeps its paths exactly
    assert _graph_path("cpu", cpu, threshold) == "cpu"
    assert _graph_path("sorted", torch.zeros(1, device="meta"), top_k) == "sorted"
    assert _graph_path("triton", torch.zeros(1, device="meta"), threshold) == "triton"
