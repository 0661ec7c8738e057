"""The CPU fast paths (sorted dispatch + grouped products) against the plain references."""

import dataclasses

import pytest
import torch
from kernel_cases import SETTING_IDS, SETTINGS, left_padded, make_routing, mlp_inputs, moa_inputs, tolerances

from dsmoe import kernels
from dsmoe.config import ConfigError
from dsmoe.kernels import cpu, onednn
from dsmoe.kernels.cpu import SortedPairs, expert_mlp_cpu, moa_cpu, moa_per_expert, moa_sorted
from dsmoe.kernels.reference import expert_mlp_reference, moa_reference
from dsmoe.model.routing import Routing
from dsmoe.model.settings import Kernels, SparseSetting

DTYPES = [torch.float32, torch.bfloat16]


def moa_all_heads_plain(x, wq, wo, routing, ctx):
    """``moa_all_heads`` through plain products of the whole W_q and W_o."""
    return cpu.moa_all_heads(
        x, routing, ctx, lambda a: a @ wq.flatten(0, 1).T, lambda o: o @ wo.flatten(0, 1)
    )


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("n_tokens", [1, 7, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expert_mlp_cpu_matches_reference(setting, n_tokens, dtype):
    x, w_in, w_out = mlp_inputs(n_tokens, 8, 32, 16, "gelu", dtype)
    routing = make_routing(n_tokens, 8, setting)
    out = expert_mlp_cpu(x, w_in, w_out, routing, "gelu")
    assert out.dtype == dtype
    torch.testing.assert_close(
        out, expert_mlp_reference(x, w_in, w_out, routing, "gelu"), **tolerances(dtype)
    )


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_expert_prefill_path_matches_reference(monkeypatch, setting, activation, dtype):
    monkeypatch.setattr(cpu, "LOOP_PAIRS_PER_EXPERT", 2)  # 40 tokens then take the long-prefill path
    x, w_in, w_out = mlp_inputs(40, 8, 32, 16, activation, dtype)
    routing = make_routing(40, 8, setting)
    assert int(routing.mask.sum()) >= 2 * 8
    out = expert_mlp_cpu(x, w_in, w_out, routing, activation)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out, expert_mlp_reference(x, w_in, w_out, routing, activation), **tolerances(dtype)
    )


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_one_token_path_reads_only_selected_experts(activation):
    x, w_in, w_out = mlp_inputs(1, 8, 32, 16, activation, torch.float32)
    routing = Routing(
        indices=torch.tensor([[6, 1, 3]]),
        weights=torch.tensor([[0.5, 0.3, 0.2]]),
        mask=torch.tensor([[True, True, False]]),
        n_experts=8,
    )
    expected = expert_mlp_reference(x, w_in, w_out, routing, activation)
    unused = [0, 2, 3, 4, 5, 7]  # expert 3 is selected but masked out
    w_in[unused], w_out[unused] = float("nan"), float("nan")
    torch.testing.assert_close(
        expert_mlp_cpu(x, w_in, w_out, routing, activation), expected, rtol=1e-4, atol=1e-5
    )
    none = Routing(
        indices=routing.indices,
        weights=routing.weights,
        mask=torch.zeros(1, 3, dtype=torch.bool),
        n_experts=8,
    )
    assert torch.equal(expert_mlp_cpu(x, w_in, w_out, none, activation), torch.zeros(1, 32))


@pytest.mark.parametrize(
    "shape", [(33, 7, 5), (32, 16, 1), (48, 24, 6)], ids=["odd-widths", "one-expert", "swiglu"]
)
def test_expert_mlp_cpu_odd_shapes(shape):
    d_model, d_expert, n_experts = shape
    activation = "swiglu" if shape == (48, 24, 6) else "gelu"
    x, w_in, w_out = mlp_inputs(9, n_experts, d_model, d_expert, activation, torch.float32)
    routing = make_routing(9, n_experts, SparseSetting("topk", k=2))
    torch.testing.assert_close(
        expert_mlp_cpu(x, w_in, w_out, routing, activation),
        expert_mlp_reference(x, w_in, w_out, routing, activation),
        rtol=1e-4,
        atol=1e-5,
    )


def test_experts_without_tokens_and_dropped_pairs():
    """Only experts 2 and 5 get tokens; the threshold mask drops some pairs, which must contribute nothing."""
    x, w_in, w_out = mlp_inputs(3, 8, 32, 16, "gelu", torch.float32)
    routing = Routing(
        indices=torch.tensor([[5, 2], [2, 0], [5, 7]]),
        weights=torch.tensor([[0.6, 0.3], [0.9, 0.1], [0.5, 0.4]]),
        mask=torch.tensor([[True, True], [True, False], [True, False]]),
        n_experts=8,
    )
    pairs = SortedPairs(routing)
    assert pairs.expert_P.tolist() == [2, 2, 5, 5]
    assert pairs.offs_N.tolist() == [0, 0, 2, 2, 2, 4, 4, 4]
    out = expert_mlp_cpu(x, w_in, w_out, routing, "gelu")
    torch.testing.assert_close(
        out, expert_mlp_reference(x, w_in, w_out, routing, "gelu"), rtol=1e-4, atol=1e-5
    )
    w_in[[0, 7]] = float("nan")  # experts of dropped pairs are never read
    assert torch.isfinite(expert_mlp_cpu(x, w_in, w_out, routing, "gelu")).all()


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize(
    "batch,new_tokens,cached",
    [(1, 1, 9), (3, 1, 5), (2, 6, 0), (2, 4, 3)],
    ids=["decode-b1", "decode-b3", "prefill", "chunk-after-cache"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "moa", [moa_sorted, moa_per_expert, moa_all_heads_plain], ids=["sorted", "per-expert", "all-heads"]
)
def test_moa_cpu_matches_reference(setting, batch, new_tokens, cached, dtype, moa):
    n_experts, n_head, head_dim, n_kv = 4, 2, 8, 2
    x, wq, wo, ctx = moa_inputs(batch, new_tokens, cached, n_experts, n_head, head_dim, n_kv, 32, dtype)
    routing = make_routing(batch * new_tokens, n_experts, setting)
    out = moa(x, wq, wo, routing, ctx)
    assert out.dtype == dtype
    torch.testing.assert_close(out, moa_reference(x, wq, wo, routing, ctx), **tolerances(dtype))


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("new_tokens,cached", [(1, 6), (6, 0), (3, 4)], ids=["decode", "prefill", "chunk"])
@pytest.mark.parametrize(
    "moa", [moa_sorted, moa_per_expert, moa_all_heads_plain], ids=["sorted", "per-expert", "all-heads"]
)
def test_moa_cpu_left_padded_batch_matches_reference(setting, new_tokens, cached, moa):
    x, wq, wo, ctx = left_padded(
        moa_inputs(3, new_tokens, cached, 4, 2, 8, 2, 32, torch.float32), pads=[0, 2, 5]
    )
    routing = make_routing(3 * new_tokens, 4, setting)
    out = moa(x, wq, wo, routing, ctx)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, moa_reference(x, wq, wo, routing, ctx), rtol=1e-4, atol=1e-5)


def test_moa_cpu_takes_each_path_where_it_pays(monkeypatch):
    """Where oneDNN multiplies the weights: many pairs per expert, one expert at a time; fewer, every head at once.
    Elsewhere (small weights, bf16), the grouped products."""
    taken = []
    for path in ("moa_per_expert", "moa_all_heads", "moa_sorted"):
        original = getattr(cpu, path)
        monkeypatch.setattr(cpu, path, lambda *a, p=path, f=original: taken.append(p) or f(*a))
    routing = make_routing(6, 4, SparseSetting("topk", k=2))
    x, wq, wo, ctx = moa_inputs(2, 3, 2, 4, 2, 8, 2, 32, torch.float32)
    expected = moa_reference(x, wq, wo, routing, ctx)
    torch.testing.assert_close(moa_cpu(x, wq, wo, routing, ctx), expected)  # below oneDNN's size floor
    monkeypatch.setattr(onednn, "ONEDNN_MIN_WEIGHTS", 0)
    torch.testing.assert_close(moa_cpu(x, wq, wo, routing, ctx), expected)  # 3 pairs per expert
    monkeypatch.setattr(cpu, "ATTENTION_LOOP_PAIRS_PER_EXPERT", 3)
    torch.testing.assert_close(moa_cpu(x, wq, wo, routing, ctx), expected)
    bf16 = moa_inputs(2, 3, 2, 4, 2, 8, 2, 32, torch.bfloat16)
    moa_cpu(bf16[0], bf16[1], bf16[2], routing, bf16[3])  # oneDNN multiplies fp32 only
    assert taken == ["moa_sorted", "moa_all_heads", "moa_per_expert", "moa_sorted"]


def moa_all_heads_plain(x, wq, wo, routing, ctx):
    """``moa_all_heads`` through plain products of the whole W_q and W_o."""
    return cpu.moa_all_heads(
        x, routing, ctx, lambda a: a @ wq.flatten(0, 1).T, lambda o: o @ wo.flatten(0, 1)
    )


def test_moa_cpu_any_token_layout_falls_back_to_reference():
    x, wq, wo, ctx = moa_inputs(2, 3, 2, 4, 2, 8, 2, 32, torch.float32)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # tokens shuffled across batch rows
    routing = make_routing(6, 4, SparseSetting("topk", k=2))
    shuffled = dataclasses.replace(ctx, batch_T=ctx.batch_T[perm], pos_T=ctx.pos_T[perm])
    ref = moa_reference(x[perm], wq, wo, routing, shuffled)
    for moa in (moa_sorted, moa_cpu):
        torch.testing.assert_close(moa(x[perm], wq, wo, routing, shuffled), ref, rtol=1e-4, atol=1e-5)


def test_the_kernel_table_takes_a_differentiable_path_when_a_gradient_is_needed():
    x = torch.zeros(4, 32)
    assert kernels.implementation(Kernels(), x) == "cpu"
    assert kernels.implementation(Kernels(), x, needs_grad=True) == "grouped"
    assert kernels.implementation(Kernels("reference"), x) == "reference"
    assert kernels.implementation(Kernels("reference"), x, needs_grad=True) == "reference"
    assert kernels.implementation(Kernels("triton"), x) == "triton"
    assert kernels.implementation(Kernels(), torch.zeros(1, device="meta")) == "reference"
    with pytest.raises(ConfigError, match="unknown kernels 'fast'"):
        Kernels("fast")


@pytest.mark.parametrize("regime", ["dsmoe", "smoe"])
def test_sparse_model_on_fast_path_matches_reference_kernels(regime):
    """A sparse model gives the same logits through the fast kernels as through the references, prefill and decode
    with the KV cache."""
    from helpers import small_config

    from dsmoe.model.plan import SparsePlan
    from dsmoe.model.transformer import Transformer

    model = Transformer(small_config(regime)).eval()
    plan = SparsePlan.build(
        model.cfg,
        att=SparseSetting("topk", k=2) if regime == "dsmoe" else None,
        mlp=SparseSetting("threshold", threshold=1.0) if regime == "dsmoe" else None,
    )
    idx = torch.randint(0, 97, (2, 9))

    def run(plan):
        with torch.inference_mode():
            cache = model.new_cache(2, 10)
            prefill = model(idx, plan=plan, cache=cache).logits
            step = model(idx[:, :1], plan=plan, cache=cache, start_pos=9).logits
        return prefill, step

    for a, b in zip(run(plan), run(plan.with_kernels("reference")), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16-cpu", "avx2-cpu"])
def test_bf16_prefill_upcast_and_decode_native_paths_agree(monkeypatch, native):
    """Without native bf16 products, many rows per expert take the fp32-upcast product and few rows the native bf16
    one; with them (AVX512-BF16/AMX), both take the native one. All match the reference."""
    from dsmoe.kernels import cpu

    monkeypatch.setattr(cpu, "NATIVE_BF16", native)
    seen = []
    inner = cpu._grouped_mm
    monkeypatch.setattr(cpu, "_grouped_mm", lambda a, b, offs: seen.append(a.dtype) or inner(a, b, offs))
    prefill_dtype = torch.bfloat16 if native else torch.float32
    for n_tokens, path in (
        (64, prefill_dtype),
        (3, torch.bfloat16),
    ):  # 128 rows >= 8 x 4 experts; 6 rows < 32
        x, w_in, w_out = mlp_inputs(n_tokens, 4, 32, 16, "gelu", torch.bfloat16)
        routing = make_routing(n_tokens, 4, SparseSetting("topk", k=2))
        seen.clear()
        out = expert_mlp_cpu(x, w_in, w_out, routing, "gelu")
        assert seen == [path, path] and out.dtype == torch.bfloat16
        torch.testing.assert_close(
            out, expert_mlp_reference(x, w_in, w_out, routing, "gelu"), **tolerances(torch.bfloat16)
        )


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "upcast-to-fp32"])
@pytest.mark.parametrize("path", ["sorted", "per-expert"])
def test_bf16_products_native_or_upcast_match_reference(monkeypatch, native, path):
    """bf16 expert products run natively on CPUs with AVX512-BF16/AMX and in fp32 elsewhere (many rows per expert):
    both branches against the reference, whatever CPU runs the test."""
    monkeypatch.setattr(cpu, "NATIVE_BF16", native)
    if path == "per-expert":
        monkeypatch.setattr(cpu, "LOOP_PAIRS_PER_EXPERT", 2)
    x, w_in, w_out = mlp_inputs(40, 8, 32, 16, "swiglu", torch.bfloat16)
    routing = make_routing(40, 8, SparseSetting("topk", k=2))
    assert cpu.upcast_bf16(x, rows_per_expert=10) is (not native)
    out = expert_mlp_cpu(x, w_in, w_out, routing, "swiglu")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out, expert_mlp_reference(x, w_in, w_out, routing, "swiglu"), **tolerances(torch.bfloat16)
    )


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("n_tokens", [1, 2])
def test_gathered_decode_path_matches_reference_compiled_and_is_taken_only_for_topk(
    monkeypatch, activation, n_tokens
):
    """Compiled top-k decode traces ``expert_mlp_gathered`` into the graph; a threshold routing (slots over every
    expert) keeps the custom op, whose one-token path reads only the selected experts."""
    torch.manual_seed(0)
    n, f, d = 8, 12, 16
    x = torch.randn(n_tokens, d)
    w_in = torch.randn(n, 2 * f if activation == "swiglu" else f, d) / d**0.5
    w_out = torch.randn(n, f, d) / f**0.5
    topk = make_routing(n_tokens, n, SparseSetting("topk", k=3))
    expected = expert_mlp_reference(x, w_in, w_out, topk, activation)
    torch.testing.assert_close(cpu.expert_mlp_gathered(x, w_in, w_out, topk, activation), expected)
    compiled = torch.compile(
        lambda x, r: kernels.expert_mlp(x, w_in, w_out, r, activation, Kernels("cpu", compiled=True)),
        fullgraph=True,
    )
    torch.testing.assert_close(compiled(x, topk), expected, rtol=1e-5, atol=1e-5)
    threshold = make_routing(n_tokens, n, SparseSetting("threshold", threshold=1.0))
    torch.testing.assert_close(
        compiled(x, threshold),
        expert_mlp_reference(x, w_in, w_out, threshold, activation),
        rtol=1e-5,
        atol=1e-5,
    )
    calls = []
    original = cpu.expert_mlp_gathered
    monkeypatch.setattr(
        kernels, "expert_mlp_gathered", lambda *a: calls.append(a[3].all_valid) or original(*a)
    )
    for routing in (topk, threshold):
        kernels.expert_mlp(x, w_in, w_out, routing, activation, Kernels("cpu", compiled=True))
    assert calls == [True]


@pytest.mark.parametrize("padded", [False, True])
def test_gathered_attention_decode_matches_reference_compiled_and_is_taken_only_where_vouched(
    monkeypatch, padded
):
    """Compiled top-k decode of batch-major tokens (MoA.forward vouches for the layout) traces ``moa_gathered`` into
    the graph; threshold routings and contexts of unknown layout keep the custom op."""
    args = moa_inputs(2, 1, 5, 8, 2, 8, 4, 32, torch.float32)
    if padded:
        args = left_padded(args, [0, 3])
    x, wq, wo, ctx = args
    ctx = dataclasses.replace(ctx, batch_major=True)
    topk = make_routing(2, 8, SparseSetting("topk", k=3))
    expected = moa_reference(x, wq, wo, topk, ctx)
    torch.testing.assert_close(cpu.moa_gathered(x, wq, wo, topk, ctx), expected, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(
        lambda x, r, c: kernels.moa(x, wq, wo, r, c, Kernels("cpu", compiled=True)), fullgraph=True
    )
    torch.testing.assert_close(compiled(x, topk, ctx), expected, rtol=1e-5, atol=1e-5)
    threshold = make_routing(2, 8, SparseSetting("threshold", threshold=1.0))
    torch.testing.assert_close(
        compiled(x, threshold, ctx), moa_reference(x, wq, wo, threshold, ctx), rtol=1e-5, atol=1e-5
    )
    calls = []
    original = cpu.moa_gathered
    monkeypatch.setattr(kernels, "moa_gathered", lambda *a: calls.append(a[3].all_valid) or original(*a))
    unvouched = dataclasses.replace(ctx, batch_major=False)
    for routing, c in ((topk, ctx), (threshold, ctx), (topk, unvouched)):
        kernels.moa(x, wq, wo, routing, c, Kernels("cpu", compiled=True))
    assert calls == [True]
