"""The transformer's math against plain per-expert computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import small_config

from dsmoe.model.losses import mutual_information_loss, switch_loss
from dsmoe.model.plan import SparsePlan
from dsmoe.model.rope import apply_rope
from dsmoe.model.routing import route
from dsmoe.model.settings import DENSE, SparseSetting
from dsmoe.model.transformer import Transformer


def test_dense_mlp_equals_sum_of_experts_one_by_one():
    model = Transformer(small_config())
    mlp = model.blocks[0].mlp
    x = torch.randn(10, 32)
    probs = mlp.router(x)
    expected = sum(
        probs[:, e : e + 1] * (F.gelu(x @ mlp.experts.w_in[e].T) @ mlp.experts.w_out[e]) for e in range(8)
    )
    out, _ = mlp(x, DENSE)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def _moa_by_hand(att, x, cos, sin):
    """MoA eq. 7-8, one expert and one head at a time, with an explicit causal softmax."""
    b, t, _ = x.shape
    d = att.head_dim
    k = apply_rope((x @ att.wk.weight.T).view(b, t, att.n_kv, d), cos[:t, None], sin[:t, None])
    v = (x @ att.wv.weight.T).view(b, t, att.n_kv, d)
    probs = att.router(x.reshape(b * t, -1)).view(b, t, -1)
    heads_per_expert = att.wq.shape[1] // d
    group = att.n_heads // att.n_kv
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    out = torch.zeros_like(x)
    for e in range(att.n_experts):
        q = apply_rope((x @ att.wq[e].T).view(b, t, heads_per_expert, d), cos[:t, None], sin[:t, None])
        o_e = []
        for j in range(heads_per_expert):
            kv = (e * heads_per_expert + j) // group
            scores = q[:, :, j] @ k[:, :, kv].transpose(1, 2) / math.sqrt(d)
            attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            o_e.append(attn @ v[:, :, kv])
        out += probs[..., e : e + 1] * (torch.cat(o_e, dim=-1) @ att.wo[e])
    return out


def test_dense_moa_equals_sum_of_experts_one_by_one():
    model = Transformer(small_config())
    att = model.blocks[0].att
    x = torch.randn(2, 7, 32)
    out, _ = att(x, model.rope_cos, model.rope_sin, DENSE)
    torch.testing.assert_close(
        out, _moa_by_hand(att, x, model.rope_cos, model.rope_sin), rtol=1e-5, atol=1e-6
    )


def _logits(model, idx, plan=None):
    with torch.no_grad():
        return model(idx, plan=plan).logits


@pytest.mark.parametrize("setting", [SparseSetting("topk", k=8), SparseSetting("threshold", threshold=1e-9)])
def test_sparse_with_every_expert_equals_dense(setting):
    model = Transformer(small_config()).eval()
    idx = torch.randint(0, 97, (2, 9))
    dense = _logits(model, idx)
    att = SparseSetting(setting.strategy, k=4 if setting.k else None, threshold=setting.threshold)
    plan = SparsePlan.build(model.cfg, att=att, mlp=setting)
    torch.testing.assert_close(_logits(model, idx, plan), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "setting",
    [
        SparseSetting("topk", k=1),
        SparseSetting("topk", k=3),
        SparseSetting("threshold", threshold=1.0),
        SparseSetting("threshold", threshold=1.3),
        SparseSetting("threshold_topk", threshold=0.9),
        SparseSetting("topk", k=2, normalize=True),
    ],
)
@pytest.mark.parametrize("kind", ["att", "mlp"])
def test_sparse_dispatch_equals_dense_with_unselected_experts_zeroed(setting, kind):
    """The gather/compute/scatter path against the dense path whose router weights are masked."""
    model = Transformer(small_config(n_mlp_experts=8)).eval()
    layer = getattr(model.blocks[0], kind)
    x = torch.randn(2, 6, 32)
    probs = layer.router(x.reshape(12, 32))
    routing = route(probs, setting)
    masked = torch.zeros_like(probs).scatter_add_(1, routing.indices, routing.weights * routing.mask)
    layer.router.forward = lambda _x, p=probs: p  # freeze the scores so both runs see the same routing
    with torch.no_grad():
        if kind == "mlp":
            dense = layer.experts.dense(x.reshape(12, 32), masked)
            sparse, _ = layer(x.reshape(12, 32), setting)
        else:
            layer.router.forward = lambda _x, p=masked: p
            dense, _ = layer(x, model.rope_cos, model.rope_sin, DENSE)
            layer.router.forward = lambda _x, p=probs: p
            sparse, _ = layer(x, model.rope_cos, model.rope_sin, setting)
    torch.testing.assert_close(sparse.reshape(dense.shape), dense, rtol=1e-5, atol=1e-6)


def test_threshold_selects_varying_counts_and_at_least_one():
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.31, 0.30, 0.29, 0.10], [0.26, 0.25, 0.25, 0.24]])
    routing = route(probs, SparseSetting("threshold", threshold=1.1))  # S_i * 4 > 1.1  <=>  S_i > 0.275
    assert routing.counts_per_token.tolist() == [1, 3, 1]  # the uniform token keeps its top expert
    tt = route(probs, SparseSetting("threshold_topk", threshold=1.1))
    assert tt.counts_per_token.tolist() == [2, 2, 2]  # mean count 5/3 rounds to K = 2
    # shapes never depend on the data: all N experts in order, the mask keeps each token's count
    assert routing.indices.shape == tt.indices.shape == (3, 4)
    assert routing.indices[:, :1].tolist() == probs.argmax(-1, keepdim=True).tolist()
    token, expert, weight, counts = routing.pairs()
    assert counts.tolist() == [3, 1, 1, 0] and (expert.diff() >= 0).all()


@pytest.mark.parametrize("eps", [0.5, 1.0, 1.7])
def test_threshold_mask_is_each_tokens_count_of_experts_above_eps(eps):
    """The threshold mask (a prefix of the sorted scores) keeps exactly the experts with N * S_i > eps, at least
    one, also where scores tie at the threshold."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 16, generator=gen) * 2, -1)
    probs[:8] = 1 / 16  # ties, right at eps = 1.0
    routing = route(probs, SparseSetting("threshold", threshold=eps))
    expected = (probs * 16 > eps).sum(-1).clamp_min(1)
    assert routing.counts_per_token.tolist() == expected.tolist()
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, routing.indices, routing.mask)
    top = torch.arange(16) == routing.indices[:, :1]  # the one kept where none is above eps (ties: any)
    assert (kept == ((probs * 16 > eps) | top)).all()


def _grad_rows(p):
    return (p.grad.flatten(1).abs().sum(1) > 0).tolist()


def test_dense_training_gives_every_expert_and_router_column_a_gradient():
    model = Transformer(small_config())
    idx = torch.randint(0, 97, (2, 12))
    model(idx[:, :-1], idx[:, 1:]).loss.backward()
    for block in model.blocks:
        for p in (
            block.att.wq,
            block.att.wo,
            block.att.router.weight,
            block.mlp.experts.w_in,
            block.mlp.experts.w_out,
            block.mlp.router.weight,
        ):
            assert all(_grad_rows(p)), p.shape


def test_sparse_training_updates_only_the_chosen_experts():
    model = Transformer(small_config("smoe"))
    chosen = {}
    for block in model.blocks:
        block.mlp.register_forward_hook(
            lambda m, inp, out: chosen.__setitem__(
                m.layer_idx, set(m.router(inp[0]).topk(2).indices.flatten().tolist())
            )
        )
    idx = torch.randint(0, 97, (1, 2))
    out = model(idx[:, :1], idx[:, 1:])
    assert out.switch is not None and out.mi_mlp is None
    out.loss.backward()
    for block in model.blocks:
        used = chosen[block.mlp.layer_idx]
        assert len(used) == 2
        grads = _grad_rows(block.mlp.experts.w_in)
        assert [e for e, g in enumerate(grads) if g] == sorted(used)
        assert all(_grad_rows(block.mlp.router.weight))  # softmax couples every router column


def test_mutual_information_loss_matches_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    h = lambda p: -sum(x * math.log(x) for x in p)
    marginal = [0.4, 0.15, 0.45]
    expected = -h(marginal) + (h([0.7, 0.2, 0.1]) + h([0.1, 0.1, 0.8])) / 2
    assert mutual_information_loss(probs).item() == pytest.approx(expected, rel=1e-6)
    padded = torch.cat([probs, torch.tensor([[1.0, 0.0, 0.0]])])
    mask = torch.tensor([True, True, False])
    assert mutual_information_loss(padded, mask).item() == pytest.approx(expected, rel=1e-6)


def test_mutual_information_minimum_only_for_balanced_one_hot_routing():
    n = 4
    assert mutual_information_loss(torch.eye(n)).item() == pytest.approx(-math.log(n), abs=1e-6)
    near = torch.eye(n) * 0.97 + 0.01
    collapsed = torch.zeros(n, n)
    collapsed[:, 0] = 1
    for probs in (near, collapsed, torch.full((n, n), 1 / n), torch.eye(n)[[0, 0, 1, 2]]):
        assert mutual_information_loss(probs).item() > -math.log(n) + 1e-3


def test_switch_loss_is_one_when_balanced():
    probs = torch.full((8, 4), 0.25)
    indices = torch.tensor([[0, 1], [2, 3]] * 4)
    assert switch_loss(probs, indices).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    assert switch_loss(skewed, torch.tensor([[0, 1]] * 8)).item() > 1.0


def test_aux_losses_are_returned_and_weighted():
    cfg = small_config(alpha_att=0.5, alpha_mlp=0.25)
    model = Transformer(cfg)
    idx = torch.randint(0, 97, (2, 8))
    out = model(idx[:, :-1], idx[:, 1:])
    expected = out.lm_loss + 0.5 * out.mi_att + 0.25 * out.mi_mlp
    torch.testing.assert_close(out.loss, expected)
    assert len(out.routers) == len(out.router_losses) == 2 * cfg.n_layers
    assert model(idx).loss is None  # no targets, no losses


def test_padding_is_excluded_from_router_losses():
    model = Transformer(small_config())
    idx = torch.randint(0, 97, (1, 8))
    targets = idx.roll(-1, 1)
    targets[:, 5:] = -100
    out_padded = model(idx, targets)
    out_short = model(idx[:, :5], targets[:, :5])
    torch.testing.assert_close(out_padded.mi_mlp, out_short.mi_mlp)
    torch.testing.assert_close(out_padded.lm_loss, out_short.lm_loss)


def test_bf16_autocast_forward_and_backward_run():
    model = Transformer(small_config())
    idx = torch.randint(0, 97, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx[:, :-1], idx[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.logits.dtype == torch.bfloat16


def test_threshold_topk_batch_mean_ignores_padding():
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 3 + [[0.3, 0.3, 0.3, 0.1]] * 3)
    setting = SparseSetting("threshold_topk", threshold=1.1)
    assert route(probs, setting).counts_per_token.tolist() == [2] * 6  # mean of 1,1,1,3,3,3
    real = torch.tensor([True, True, True, False, False, False])
    assert route(probs, setting, real).counts_per_token.tolist() == [1] * 6  # only the real tokens' counts


# Router rows over 4 experts keeping 1, 2 or 3 experts above eps = 1.0 (probability above 1/4).
ROWS_BY_COUNT = {1: [0.96, 0.02, 0.01, 0.01], 2: [0.45, 0.45, 0.05, 0.05], 3: [0.3, 0.3, 0.3, 0.1]}


@pytest.mark.parametrize("counts, k", [((2, 3), 3), ((1, 2), 2), ((2, 3, 3, 2), 3), ((1, 1, 2), 1)])
def test_threshold_topk_rounds_the_batch_mean_half_up(counts, k):
    probs = torch.tensor([ROWS_BY_COUNT[c] for c in counts])
    assert (probs * 4 > 1.0).sum(-1).tolist() == list(counts)
    routing = route(probs, SparseSetting("threshold_topk", threshold=1.0))
    # 2.5 -> 3 and 1.5 -> 2 (half up; Python's round gives 2 and 2)
    assert routing.counts_per_token.tolist() == [k] * len(counts)


def test_router_probabilities_are_computed_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = Transformer(small_config())
    router = model.blocks[0].mlp.router
    x = torch.randn(64, model.cfg.d_model)
    reference = torch.softmax(x @ router.weight.T, dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = router(x)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, reference, rtol=1e-6, atol=1e-7)


def test_switch_loss_is_averaged_over_layers_as_in_dmoe():
    torch.manual_seed(0)
    cfg = small_config("smoe", n_layers=3)
    model = Transformer(cfg)
    idx = torch.randint(0, 97, (2, 8))
    out = model(idx[:, :-1], idx[:, 1:])
    per_router = out.router_losses
    torch.testing.assert_close(out.switch, torch.stack(per_router).sum() / cfg.n_layers)
    torch.testing.assert_close(out.loss, out.lm_loss + cfg.switch_loss_weight * out.switch)
