"""The fused Triton expert MLP (``dsmoe.kernels.triton_fused``) against the plain reference: on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py when there is no GPU) at small shapes, and compiled on a
GPU (marker `gpu`), where its launches are counted by the profiler."""

import os

import pytest
import torch
from helpers import small_config
from kernel_cases import SETTING_IDS, SETTINGS, make_routing, mlp_inputs, tolerances
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from dsmoe import kernels
from dsmoe.kernels import triton_fused
from dsmoe.kernels.reference import expert_mlp_reference
from dsmoe.kernels.triton_fused import align_pairs, choose_chunk, expert_mlp_fused, n_blocks_needed
from dsmoe.kernels.triton_kernels import TRITON_AVAILABLE
from dsmoe.model.plan import SparsePlan
from dsmoe.model.routing import Routing
from dsmoe.model.settings import Kernels, SparseSetting
from dsmoe.model.transformer import Transformer

pytestmark = [
    pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed: pip install 'dsmoe[gpu]'"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="a GPU is present, so kernels are compiled; see the gpu-marked tests",
)
on_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class PoisonedAllocations(TorchDispatchMode):
    """Every new uninitialised buffer filled with garbage (NaN, or -7 in integer buffers), so that a kernel that
    reads an element no kernel wrote (a masked slot's row, a padding row) gives a wrong result rather than the zero
    that a fresh allocation often happens to hold."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in ("aten.empty.memory_format", "aten.new_empty.default"):
            out.fill_(float("nan") if out.is_floating_point() else -7)
        return out


def fused_and_reference(n_tokens, n_experts, d_model, width, activation, dtype, routing):
    x, w_in, w_out = mlp_inputs(n_tokens, n_experts, d_model, width, activation, dtype)
    with PoisonedAllocations():
        fused = expert_mlp_fused(x, w_in, w_out, routing, activation)
    return fused, expert_mlp_reference(x, w_in, w_out, routing, activation)


def routing_with_experts(experts_TK: list[list[int]], n_experts: int, mask_TK=None) -> Routing:
    indices = torch.tensor(experts_TK)
    mask = torch.ones_like(indices, dtype=torch.bool) if mask_TK is None else torch.tensor(mask_TK)
    weights = torch.linspace(0.2, 0.9, indices.numel()).view_as(indices)
    return Routing(indices, weights, mask, n_experts, all_valid=mask_TK is None)


# --- the alignment: expert-sorted pairs in groups padded to whole blocks ------------------------------------------


def expected_groups(routing: Routing) -> dict[int, list[int]]:
    """Each expert's unmasked pair ids (t*K + k), in the routing's order."""
    groups: dict[int, list[int]] = {}
    for pair, (expert, keep) in enumerate(
        zip(routing.indices.flatten().tolist(), routing.mask.flatten().tolist(), strict=True)
    ):
        if keep:
            groups.setdefault(expert, []).append(pair)
    return groups


def assert_aligned(routing: Routing, block_m: int, chunk: int | None) -> None:
    aligned = align_pairs(routing, block_m, chunk)
    n_pairs = routing.indices.numel()
    sorted_pair, block_expert = aligned.sorted_pair.tolist(), aligned.block_expert.tolist()
    assert len(block_expert) == n_blocks_needed(n_pairs, routing.n_experts, block_m)
    assert len(sorted_pair) == len(block_expert) * block_m
    groups: dict[int, list[int]] = {}
    for block, expert in enumerate(block_expert):
        rows = sorted_pair[block * block_m : (block + 1) * block_m]
        if expert < 0:
            assert rows == [n_pairs] * block_m, "a spare block holds pairs"
            continue
        real = [p for p in rows if p != n_pairs]
        assert real == rows[: len(real)], "padding before a pair in a block"
        assert real, "a block of an expert without any pair"
        groups.setdefault(expert, []).extend(real)
    assert groups == expected_groups(routing)
    used = [e for e in block_expert if e >= 0]
    assert used == sorted(used), "groups out of expert order"
    assert block_expert[len(used) :] == [-1] * (len(block_expert) - len(used)), "spare blocks before a group"


@interpreted
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("n_tokens", [1, 7, 40])
@pytest.mark.parametrize("chunk", [None, 16], ids=["one-chunk-or-default", "chunks-of-16"])
def test_align_pairs_places_every_unmasked_pair_once_in_its_experts_blocks(setting, n_tokens, chunk):
    assert_aligned(make_routing(n_tokens, 6, setting), 16, chunk)


@interpreted
def test_align_pairs_skips_experts_without_pairs_and_masked_slots():
    routing = routing_with_experts(
        [[4, 0], [4, 3], [0, 4]], 6, mask_TK=[[True, False], [True, True], [False, True]]
    )
    aligned = align_pairs(routing, 16)
    assert aligned.block_expert.tolist()[:2] == [3, 4]
    assert aligned.sorted_pair[:16].tolist() == [3] + [6] * 15  # pair 3, then padding (sentinel: 6 pairs)
    assert aligned.sorted_pair[16:20].tolist() == [0, 2, 5, 6]  # 1 and 4 are masked
    assert_aligned(routing, 16, None)


def test_n_blocks_needed_bounds_every_split():
    # 40 pairs: 3 full blocks, and each non-empty expert's last block may be partial
    assert n_blocks_needed(40, 6, 16) == 3 + 6
    assert n_blocks_needed(2, 32, 16) == 1 + 2  # at most as many groups as pairs


def test_choose_chunk_fits_the_pairs_and_the_one_hot_tile():
    assert choose_chunk(4, 32, 16) == 16  # at least one block of rows
    assert choose_chunk(128, 32, 16) == 128  # every decode pair in one chunk
    assert choose_chunk(512, 32, 16) == 512  # decode at batch 16 with a threshold routing (K = N = 32)
    assert choose_chunk(100_000, 32, 16) == 512  # 512 x 32 = the tile's 16,384 elements
    assert choose_chunk(100_000, 2, 64) == 1024  # MAX_CHUNK


# --- the MLP against the reference ------------------------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("n_tokens", [1, 7, 40])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_mlp_fused_interpreted_fp32(setting, n_tokens, activation):
    routing = make_routing(n_tokens, 6, setting)
    fused, reference = fused_and_reference(n_tokens, 6, 32, 24, activation, torch.float32, routing)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


@interpreted
@pytest.mark.parametrize("setting", [SETTINGS[1], SETTINGS[4]], ids=[SETTING_IDS[1], SETTING_IDS[4]])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_mlp_fused_interpreted_bf16(setting, activation):
    routing = make_routing(7, 6, setting)
    fused, reference = fused_and_reference(7, 6, 32, 24, activation, torch.bfloat16, routing)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, reference, **tolerances(torch.bfloat16))


@interpreted
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_mlp_fused_interpreted_odd_widths(activation):
    """Widths that are no multiple of any tile (D 19, F 13): the loads and stores are masked."""
    routing = make_routing(7, 5, SparseSetting("threshold", threshold=1.0))
    fused, reference = fused_and_reference(7, 5, 19, 13, activation, torch.float32, routing)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


@interpreted
def test_expert_mlp_fused_interpreted_with_experts_without_tokens_and_masked_slots():
    routing = routing_with_experts(
        [[5, 1], [5, 2], [1, 5]], 8, mask_TK=[[True, False], [True, True], [True, True]]
    )
    fused, reference = fused_and_reference(3, 8, 32, 24, "swiglu", torch.float32, routing)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


@interpreted
@pytest.mark.parametrize("setting", [SETTINGS[1], SETTINGS[4]], ids=[SETTING_IDS[1], SETTING_IDS[4]])
def test_expert_mlp_fused_interpreted_over_several_alignment_chunks(setting, monkeypatch):
    """40 tokens' pairs in chunks of 16: the per-chunk counts and their running sum (the prefill path)."""
    monkeypatch.setattr(triton_fused, "MAX_CHUNK", 16)
    routing = make_routing(40, 6, setting)
    fused, reference = fused_and_reference(40, 6, 32, 24, "gelu", torch.float32, routing)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


def test_expert_mlp_fused_refuses_what_it_cannot_compute(monkeypatch):
    x, w_in, w_out = mlp_inputs(3, 4, 16, 8, "swiglu", torch.float32)
    routing = make_routing(3, 4, SparseSetting("topk", k=2))
    with pytest.raises(ValueError, match="not 'relu'"):
        expert_mlp_fused(x, w_in, w_out, routing, "relu")
    with pytest.raises(ValueError, match="w_in needs 8 rows"):
        expert_mlp_fused(x, w_in, w_out, routing, "gelu")
    with pytest.raises(ValueError, match="x's width 15"):
        expert_mlp_fused(x[:, :15], w_in, w_out, routing, "swiglu")
    monkeypatch.setattr(triton_fused, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        expert_mlp_fused(x, w_in, w_out, routing, "swiglu")


# --- launches: each Triton kernel and each torch op that computes (allocations and views launch nothing) --------

# aten ops that allocate or reinterpret memory: no kernel on a GPU
NO_LAUNCH = {"aten.empty.memory_format", "aten.new_empty.default", "aten.view.dtype", "aten.detach.default"}


class LaunchLog(TorchDispatchMode):
    """The torch ops that would launch a kernel on a GPU, and the Triton kernels launched (run with the mode off,
    so that the interpreter's own tensor handling is not counted)."""

    def __init__(self):
        super().__init__()
        self.launches: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in NO_LAUNCH:
            self.launches.append(str(func))
        return func(*args, **(kwargs or {}))

    def counted(self, kernel, name: str):
        """``kernel`` (launched as kernel[grid](...)), its launches logged as ``name``."""
        log = self

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    log.launches.append(name)
                    with _disable_current_modes():
                        kernel[grid](*args, **kwargs)

                return launch

        return Counted()


def launches_of_one_call(monkeypatch, routing, n_tokens) -> list[str]:
    x, w_in, w_out = mlp_inputs(n_tokens, 6, 32, 24, "swiglu", torch.float32)
    log = LaunchLog()
    for name in ("_count_kernel", "_align_kernel", "_up_kernel", "_down_kernel", "_combine_kernel"):
        monkeypatch.setattr(triton_fused, name, log.counted(getattr(triton_fused, name), name))
    with log:
        out = expert_mlp_fused(x, w_in, w_out, routing, "swiglu")
    torch.testing.assert_close(
        out, expert_mlp_reference(x, w_in, w_out, routing, "swiglu"), rtol=1e-4, atol=1e-5
    )
    return log.launches


@interpreted
@pytest.mark.parametrize("setting", [SETTINGS[1], SETTINGS[4]], ids=[SETTING_IDS[1], SETTING_IDS[4]])
def test_four_launches_while_the_pairs_fit_one_chunk(setting, monkeypatch):
    launches = launches_of_one_call(monkeypatch, make_routing(7, 6, setting), 7)
    assert launches == ["_align_kernel", "_up_kernel", "_down_kernel", "_combine_kernel"]


@interpreted
def test_six_launches_over_several_chunks(monkeypatch):
    monkeypatch.setattr(triton_fused, "MAX_CHUNK", 16)
    launches = launches_of_one_call(monkeypatch, make_routing(40, 6, SETTINGS[4]), 40)
    assert launches == [
        "_count_kernel", "aten.cumsum.default", "_align_kernel", "_up_kernel", "_down_kernel", "_combine_kernel"
    ]  # fmt: skip


# --- the kernel choice: registered, reached eagerly and through the compiled forward's custom op -----------------


def test_fused_is_a_kernel_choice_but_not_the_cuda_default():
    assert kernels.implementation(Kernels("fused"), torch.zeros(1)) == "fused"
    assert kernels.kernels_for(torch.device("cuda")).impl == "sorted"


@interpreted
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "custom-op"])
def test_expert_mlp_dispatches_fused(compiled):
    x, w_in, w_out = mlp_inputs(5, 4, 16, 8, "gelu", torch.float32)
    routing = make_routing(5, 4, SparseSetting("threshold", threshold=1.0))
    out = kernels.expert_mlp(x, w_in, w_out, routing, "gelu", Kernels("fused", compiled=compiled))
    torch.testing.assert_close(
        out, expert_mlp_reference(x, w_in, w_out, routing, "gelu"), rtol=1e-4, atol=1e-5
    )


@interpreted
def test_fused_compiles_into_one_graph_through_the_custom_op():
    """torch.compile(fullgraph=True) traces the fused path as the custom op (its fake gives the shape): no graph
    break, as a captured decode step needs."""
    x, w_in, w_out = mlp_inputs(3, 4, 16, 8, "swiglu", torch.float32)
    routing = make_routing(3, 4, SparseSetting("threshold", threshold=1.0))

    def layer(x, indices, weights, mask):
        r = Routing(indices, weights, mask, 4, all_valid=False)
        return kernels.expert_mlp(x * 2, w_in, w_out, r, "swiglu", Kernels("fused", compiled=True))

    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    out = compiled(x, routing.indices, routing.weights, routing.mask)
    torch.testing.assert_close(
        out, expert_mlp_reference(x * 2, w_in, w_out, routing, "swiglu"), rtol=1e-4, atol=1e-5
    )


@interpreted
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_ds_moe_forward_through_fused_equals_the_reference(activation):
    torch.manual_seed(0)
    model = Transformer(small_config("dsmoe", n_layers=1, activation=activation)).eval()
    plan = SparsePlan.build(model.cfg, SparseSetting("topk", k=2), SparseSetting("threshold", threshold=1.0))
    tokens = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        fused = model(tokens, plan=plan.with_kernels("fused")).logits
        reference = model(tokens, plan=plan.with_kernels("reference")).logits
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


# --- on a GPU: compiled kernels, whole models, launches -------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_routing(routing: Routing) -> Routing:
    r = routing
    return Routing(r.indices.cuda(), r.weights.cuda(), r.mask.cuda(), r.n_experts, r.all_valid)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("setting", [SETTINGS[1], SETTINGS[4]], ids=[SETTING_IDS[1], SETTING_IDS[4]])
@pytest.mark.parametrize(
    "n_tokens,activation,dtype",
    [
        (1, "swiglu", torch.bfloat16),
        (1, "swiglu", torch.float32),
        (300, "gelu", torch.bfloat16),
        (3000, "swiglu", torch.bfloat16),
        (3000, "swiglu", torch.float32),
    ],
    ids=str,
)
def test_expert_mlp_fused_on_gpu(setting, n_tokens, activation, dtype):
    """The DS-MoE bench's expert shape (32 experts of 88, odd for every tile) at decode and prefill sizes; 3,000
    tokens span several alignment chunks."""
    x, w_in, w_out = (t.cuda() for t in mlp_inputs(n_tokens, 32, 256, 88, activation, dtype))
    routing = cuda_routing(make_routing(n_tokens, 32, setting))
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float32 else tolerances(dtype)
    torch.testing.assert_close(
        expert_mlp_fused(x, w_in, w_out, routing, activation),
        expert_mlp_reference(x, w_in, w_out, routing, activation),
        **tol,
    )


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("setting", [SETTINGS[1], SETTINGS[4]], ids=[SETTING_IDS[1], SETTING_IDS[4]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ds_moe_forward_through_fused_on_gpu_equals_the_reference(setting, dtype):
    torch.manual_seed(0)
    model = Transformer(small_config("dsmoe", d_model=64, d_expert=32, activation="swiglu")).cuda().eval()
    model = model.to(dtype)
    plan = SparsePlan.build(model.cfg, setting, setting)
    tokens = torch.randint(0, 97, (3, 40), device="cuda")
    with torch.no_grad():
        fused = model(tokens, plan=plan.with_kernels("fused")).logits.float()
        reference = model(tokens, plan=plan.with_kernels("reference")).logits.float()
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}
    torch.testing.assert_close(fused, reference, **tol)


@pytest.mark.gpu
@needs_gpu
def test_compiled_decode_through_fused_under_cuda_graphs_equals_eager():
    """The decode step captured in a CUDA graph with the fused MLP inside: no host sync may break the capture (a
    threshold routing, whose masked slots the alignment drops on the device)."""
    setting = SETTINGS[4]
    from dsmoe.inference.generate import generate

    torch.manual_seed(0)
    model = Transformer(small_config("dsmoe", d_model=64, d_expert=32)).cuda().eval()
    plan = SparsePlan.build(model.cfg, setting, setting).with_kernels("fused")
    prompt = torch.randint(0, 97, (2, 6), device="cuda")
    eager = generate(model, prompt, 16, plan=plan)
    assert torch.equal(generate(model, prompt, 16, plan=plan, compile=True), eager)


def cuda_launches(fn) -> int:
    """Kernel launches the profiler records for one call (after a warm-up call that compiles the kernels)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(("LaunchKernel" in e.name) or e.name == "cuLaunchKernel" for e in prof.events())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "n_tokens,setting,expected", [(1, SETTINGS[1], 4), (16, SETTINGS[4], 4), (3000, SETTINGS[4], 6)], ids=str
)
def test_launches_per_call_on_gpu(n_tokens, setting, expected):
    x, w_in, w_out = (t.cuda() for t in mlp_inputs(n_tokens, 32, 256, 88, "swiglu", torch.bfloat16))
    routing = cuda_routing(make_routing(n_tokens, 32, setting))
    assert cuda_launches(lambda: expert_mlp_fused(x, w_in, w_out, routing, "swiglu")) == expected
