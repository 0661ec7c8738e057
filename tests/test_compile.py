"""torch.compile sees the whole training forward of every regime (no graph break) and computes what eager computes:
DS-MoE and Dense run their experts densely; SMoE runs its top-k through the grouped-product custom ops (the count
of pairs per expert is data-dependent, but sorting by expert and the grouped products keep their shapes)."""

import pytest
import torch
from helpers import small_config

from dsmoe.model.transformer import Transformer

# inductor's own use of torch.jit.script_method warns on torch 2.13; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def loss_and_grads(model, idx, compiled):
    model.zero_grad(set_to_none=True)

    def loss_of(idx):
        out = model(idx[:, :-1], idx[:, 1:])
        return out.loss, out.lm_loss

    run = (
        torch.compile(loss_of, fullgraph=compiled == "fullgraph", backend="inductor") if compiled else loss_of
    )
    loss, lm_loss = run(idx)
    loss.backward()
    return loss.detach(), lm_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("regime", ["dsmoe", "dense", "smoe"])
def test_training_step_compiles_to_one_graph_and_matches_eager(regime):
    torch.manual_seed(0)
    model = Transformer(small_config(regime, alpha_att=0.1, alpha_mlp=0.1))
    idx = torch.randint(0, 97, (2, 17))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda i: model(i[:, :-1], i[:, 1:]).loss)(idx)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    eager = loss_and_grads(model, idx, compiled=None)
    compiled = loss_and_grads(model, idx, compiled="fullgraph")  # fullgraph=True raises on any graph break
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)
    for name, grad in eager[2].items():
        torch.testing.assert_close(compiled[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_blocks_share_one_graph():
    """compile_blocks (training's ``compile: true``): every block runs one compiled graph. A layer's forward reads
    no per-layer integer, or torch.compile would make one graph per layer and, past 8 layers, leave the rest eager."""
    from torch._dynamo.utils import counters

    from dsmoe.training.transforms import compile_blocks

    torch.manual_seed(0)
    model = compile_blocks(Transformer(small_config("dsmoe", n_layers=3)))
    idx = torch.randint(0, 97, (2, 17))
    torch._dynamo.reset()
    counters.clear()
    out = model(idx[:, :-1], idx[:, 1:])
    out.loss.backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert [r.layer for r in out.routers] == [0, 0, 1, 1, 2, 2]
