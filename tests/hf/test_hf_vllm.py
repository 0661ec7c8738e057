"""The vLLM model's math in the main venv, with plain stand-ins for vLLM's paged Attention and its GPU fused-MoE
kernel: MoA map/reduce, RoPE, weight names and the fused-expert layout of the GPU branch, which vLLM's CPU build
cannot run. The model in real vLLM is tested in tests/vllm (``make test-vllm``).
"""

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import small_config
from torch import nn

from dsmoe.hf.configuration import DSMoEConfig
from dsmoe.model.plan import SparsePlan
from dsmoe.model.rope import apply_rope, rope_tables
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer


class SingleSequenceAttention(nn.Module):
    """Causal attention over one sequence whose keys/values accumulate across calls, as a paged cache holds them."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, cache_config, quant_config, prefix):
        super().__init__()
        self.h, self.d, self.kv, self.scale = num_heads, head_size, num_kv_heads, scale
        self.keys, self.values = [], []

    def forward(self, q, k, v):
        t = q.shape[0]
        self.keys.append(k.view(t, self.kv, self.d))
        self.values.append(v.view(t, self.kv, self.d))
        keys, values = torch.cat(self.keys), torch.cat(self.values)
        s = keys.shape[0]
        visible = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
        o = F.scaled_dot_product_attention(
            q.view(t, self.h, self.d).transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=visible,
            scale=self.scale,
            enable_gqa=True,
        )
        return o.transpose(0, 1).reshape(t, -1)


class SiluAndMul(nn.Module):
    def forward(self, x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class RMSNorm(nn.Module):
    """vLLM's semantics: with a residual, (norm(x + residual), x + residual)."""

    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(hidden_size)), eps

    def forward(self, x, residual=None):
        if residual is not None:
            x = x + residual
        out = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return out if residual is None else (out, x)


class NeoxRotary(nn.Module):
    def __init__(self, head_size, max_position, is_neox_style, rope_parameters):
        super().__init__()
        self.d = head_size
        self.cos, self.sin = rope_tables(head_size, max_position, rope_parameters["rope_theta"])

    def forward(self, positions, q, k):
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        rotate = lambda x: apply_rope(x.view(x.shape[0], -1, self.d), cos, sin).flatten(1)
        return rotate(q), rotate(k)


def fused_experts(x, w1, w2, topk_weights, topk_ids):
    """vLLM's documented fused-MoE semantics: w1 [E, 2I, H] = [gate; up], w2 [E, H, I], silu(gate) * up."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for weight, e in zip(topk_weights[t], topk_ids[t].long(), strict=True):
            gate, up = F.linear(x[t], w1[e]).chunk(2)
            out[t] += weight.to(x.dtype) * F.linear(F.silu(gate) * up, w2[e])
    return out


@pytest.fixture
def vllm_model_module(monkeypatch):
    names = [
        "vllm",
        "vllm.platforms",
        "vllm.model_executor",
        "vllm.model_executor.layers",
        "vllm.model_executor.layers.attention",
        "vllm.model_executor.layers.fused_moe",
        "vllm.model_executor.layers.utils",
        "vllm.model_executor.layers.activation",
        "vllm.model_executor.layers.layernorm",
        "vllm.model_executor.layers.rotary_embedding",
    ]
    fake = {name: types.ModuleType(name) for name in names}
    fake["vllm.model_executor.layers.attention"].Attention = SingleSequenceAttention
    fake["vllm.model_executor.layers.fused_moe"].fused_experts = fused_experts
    fake["vllm.model_executor.layers.activation"].SiluAndMul = SiluAndMul
    fake["vllm.model_executor.layers.layernorm"].RMSNorm = RMSNorm
    fake["vllm.model_executor.layers.rotary_embedding"].get_rope = NeoxRotary
    fake[
        "vllm.model_executor.layers.utils"
    ].dispatch_cpu_unquantized_gemm = None  # CPU only: never called here
    gpu = types.SimpleNamespace(is_cuda_alike=lambda: True, is_cpu=lambda: False)
    fake["vllm.platforms"].current_platform = gpu  # the GPU branch: F.linear and the fused-MoE kernel
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "dsmoe.hf.vllm_model", raising=False)
    yield importlib.import_module("dsmoe.hf.vllm_model")
    sys.modules.pop("dsmoe.hf.vllm_model", None)


@pytest.mark.parametrize("activation,norm", [("swiglu", "rmsnorm"), ("gelu", "layernorm")])
def test_vllm_model_matches_native_prefill_and_decode(vllm_model_module, activation, norm):
    cfg = small_config(activation=activation, norm=norm)
    native = Transformer(cfg).eval()
    att, mlp = SparseSetting("topk", k=2), SparseSetting("threshold", threshold=1.0)
    plan = SparsePlan.build(cfg, att=att, mlp=mlp)
    hf_config = DSMoEConfig.from_model_config(
        cfg, att_strategy="topk", att_k=2, mlp_strategy="threshold", mlp_threshold=1.0
    )
    vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_config=hf_config, model="weights given to load_weights"),
        cache_config=None,
        quant_config=None,
        parallel_config=types.SimpleNamespace(tensor_parallel_size=1),
    )
    model = vllm_model_module.DSMoEForVLLM(vllm_config=vllm_config).eval()
    state = {f"model.{k}": v for k, v in native.state_dict().items()}
    assert model.load_weights(iter(state.items())) >= set(state)
    fused = [block.mlp.experts.w_out_EDF is not None for block in model.model.block_list()]
    assert fused == [activation == "swiglu"] * cfg.n_layers  # the threshold layers: vLLM's fused MoE on a GPU

    idx = torch.randint(0, 97, (9,))
    with torch.no_grad():
        prefill = model.compute_logits(model(idx[:6], torch.arange(6)))
        decode = [model.compute_logits(model(idx[p : p + 1], torch.tensor([p]))) for p in range(6, 9)]
        reference = native(idx[None], plan=plan).logits[0]
    torch.testing.assert_close(prefill, reference[:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(decode), reference[6:], rtol=1e-5, atol=1e-5)


def test_vllm_plugin_is_harmless_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    from dsmoe.hf import vllm_plugin

    with pytest.raises(ImportError, match="pip install vllm"):
        vllm_plugin.register()


def test_vllm_plugin_registers_the_architecture_lazily(monkeypatch):
    registered = {}
    registry = types.SimpleNamespace(
        get_supported_archs=lambda: list(registered),
        register_model=lambda arch, cls: registered.setdefault(arch, cls),
    )
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(ModelRegistry=registry))
    from dsmoe.hf import vllm_plugin

    vllm_plugin.register()
    assert registered == {"DSMoEForCausalLM": "dsmoe.hf.vllm_model:DSMoEForVLLM"}
    assert "dsmoe.hf.vllm_model" not in sys.modules
