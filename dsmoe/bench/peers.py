"""The peers ``dsmoe bench --peers`` measures beside our models: what a user would otherwise run, at the same shape.

* ``hf-llama``: transformers' ``LlamaForCausalLM`` at our Dense model's shape (``--shape llama``). It is the same
  network: ``dsmoe convert`` maps a Llama onto our Dense model exactly (tests/convert, tests/test_bench.py).
* ``hf-olmoe``: transformers' ``OlmoeForCausalLM`` at our DS-MoE model's shape: the same MLP experts (count, width,
  SwiGLU), the same top-k per token and the same treatment of the selected scores (``norm_topk_prob`` is our sparse
  setting's ``normalize``, off by default: both mix experts by their unnormalised softmax scores), dense attention.
  Two parts differ by design and are reported: OLMoE normalises queries and keys (QK-norm: two RMSNorms per layer)
  and has no attention experts, so none of our DS-MoE's attention routers.

Both run as built from their configs (random weights; nothing is fetched), with ``attn_implementation="sdpa"``,
transformers' default experts implementation, in eval mode, in the bench's dtype and on its device and threads; they
decode with their own ``DynamicCache`` and generate through ``GenerationMixin.generate``.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsmoe.bench.models import BenchModel
from dsmoe.bench.settings import PEERS
from dsmoe.config import ConfigError
from dsmoe.model.transformer import Transformer


class PeerMismatch(RuntimeError):
    """A peer does not have our model's parameters (beyond the parts that differ by design): the comparison is off."""


@dataclass
class Peer:
    name: str  # hf-llama / hf-olmoe
    of: str  # the model of ours it is measured against
    model: Any  # a transformers PreTrainedModel (untyped there)
    hf_config: dict[str, Any]  # the config fields set from our model's shape
    param_check: dict[str, Any]
    total_params: int  # non-embedding, counted on the module
    active_params: int
    embedding_params: int

    def describe(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "of": self.of,
            "class": type(self.model).__name__,
            "attn_implementation": config._attn_implementation,
            "experts_implementation": (  # how transformers runs the experts (MoE peers only)
                config._experts_implementation if getattr(config, "num_experts", None) else None
            ),
            "config": self.hf_config,
            "param_check": self.param_check,
        }


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ConfigError("--peers builds transformers' models: pip install 'dsmoe[hf]'") from err
    return transformers


def olmoe_config_builds(transformers) -> bool:
    """False on transformers releases whose OlmoeConfig() raises (5.4 does)."""
    try:
        transformers.OlmoeConfig()
    except Exception:  # huggingface_hub's strict-dataclass error, whose class varies by release
        return False
    return True


def peer_config(entry: BenchModel) -> tuple[str, Any, dict[str, Any]]:
    """(peer name, transformers config, the fields set) of the peer of one of our bench models."""
    if entry.name not in PEERS:
        raise ConfigError(f"model '{entry.name}' has no peer; peers exist for {', '.join(PEERS)}")
    cfg = entry.cfg
    if cfg.activation != "swiglu" or cfg.norm != "rmsnorm":
        raise ConfigError(
            f"the peers have SwiGLU MLPs and RMSNorm; model '{entry.name}' has {cfg.activation} and {cfg.norm}: "
            "use --shape llama"
        )
    transformers = _transformers()
    fields: dict[str, Any] = dict(
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_query_heads,
        num_key_value_heads=cfg.n_kv_heads,
        intermediate_size=cfg.d_expert,
        hidden_act="silu",
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        initializer_range=cfg.init_std,
        attention_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if (
        cfg.tie_embeddings
    ):  # untied is every config's default; OlmoeConfig 5.4 types the field int and refuses False
        fields["tie_word_embeddings"] = True
    name = PEERS[entry.name]
    if name == "hf-llama":
        fields.update(head_dim=cfg.head_dim, mlp_bias=False)
        config_class = transformers.LlamaConfig
    else:
        mlp = entry.mlp
        if mlp is None or mlp.strategy != "topk" or mlp.k is None:
            raise ConfigError("hf-olmoe routes a fixed top-k: DS-MoE's MLP setting must be topk")
        if cfg.head_dim * cfg.n_query_heads != cfg.d_model:
            # OLMoE sizes its key norm as (hidden_size / heads) * kv_heads: heads must tile the width exactly
            raise ConfigError("hf-olmoe needs query heads that tile d_model exactly")
        fields.update(
            num_experts=cfg.n_mlp_experts,
            num_experts_per_tok=mlp.k,
            norm_topk_prob=mlp.normalize,
            output_router_logits=False,
            clip_qkv=None,
        )
        if not olmoe_config_builds(transformers):
            raise ConfigError(
                f"transformers {transformers.__version__}'s OlmoeConfig rejects its own defaults (tie_word_embeddings"
                " typed int), so the OLMoE peer cannot be built: --peers needs a newer transformers (5.24 is tested)"
            )
        config_class = transformers.OlmoeConfig
    fields["tie_word_embeddings"] = cfg.tie_embeddings
    return name, config_class(**fields, attn_implementation="sdpa"), fields


def _non_embedding(model: nn.Module, embeddings: list[torch.Tensor]) -> int:
    skip = {id(p) for p in embeddings}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _count(model: nn.Module, *parts: str) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if any(part in name for part in parts))


def _peer_embeddings(peer: Any) -> list[torch.Tensor]:
    return [peer.get_input_embeddings().weight, peer.get_output_embeddings().weight]


def check_params(ours: Transformer, entry: BenchModel, peer_name: str, peer: Any) -> dict[str, Any]:
    """Both non-embedding parameter counts and what separates them; PeerMismatch unless exactly the parts that
    differ by design do (OLMoE's QK-norms, our DS-MoE's attention routers; nothing between Dense and Llama)."""
    our_embeddings = [ours.embed.weight] + ([ours.lm_head.weight] if ours.lm_head is not None else [])
    peer_embeddings = _peer_embeddings(peer)
    ours_total = _non_embedding(ours, our_embeddings)
    peer_total = _non_embedding(peer, peer_embeddings)
    only_ours = {"attention routers": _count(ours, "att.router.")}
    only_peer = {"q/k norms (QK-norm)": _count(peer, "self_attn.q_norm.", "self_attn.k_norm.")}
    shared_ours = ours_total - sum(only_ours.values())
    shared_peer = peer_total - sum(only_peer.values())
    check = {
        "dsmoe": ours_total,
        "peer": peer_total,
        "only_in_dsmoe": {k: v for k, v in only_ours.items() if v},
        "only_in_peer": {k: v for k, v in only_peer.items() if v},
        "shared": shared_ours,
    }
    if shared_ours != shared_peer or ours_total != entry.cfg.non_embedding_params:
        raise PeerMismatch(
            f"{peer_name} is not at the shape of our '{entry.name}': {peer_total:,} non-embedding parameters "
            f"against our {ours_total:,} (config: {entry.cfg.non_embedding_params:,}); apart from "
            f"{only_peer} in the peer and {only_ours} in ours they should be equal, but differ by "
            f"{shared_peer - shared_ours:+,}"
        )
    return check


def _active_params(peer: Any, total: int) -> int:
    """Non-embedding parameters one token uses: all, less the experts an MoE layer does not select."""
    config = peer.config
    unused = 0
    for module in peer.modules():
        if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
            n = module.gate_up_proj.shape[0]
            per_expert = (module.gate_up_proj.numel() + module.down_proj.numel()) // n
            unused += (n - config.num_experts_per_tok) * per_expert
    return total - unused


def build_peers(
    entries: list[BenchModel], models: dict[str, Transformer], device: str, dtype: torch.dtype
) -> list[Peer]:
    """The peer of each of our models that has one, built at its shape and checked against it."""
    from dsmoe.bench.throughput import building_on

    peers = []
    for entry in entries:
        if entry.name not in PEERS:
            continue
        transformers = _transformers()
        name, config, fields = peer_config(entry)
        cls = transformers.LlamaForCausalLM if name == "hf-llama" else transformers.OlmoeForCausalLM
        with building_on(device, dtype):
            model = cls(config).to(device=device, dtype=dtype).eval()
        model.generation_config.eos_token_id = None  # never stop early: every run generates the same count
        model.generation_config.bos_token_id = None
        model.generation_config.pad_token_id = 0
        check = check_params(models[entry.name], entry, name, model)
        total = check["peer"]
        peers.append(
            Peer(
                name=name,
                of=entry.name,
                model=model,
                hf_config=fields,
                param_check=check,
                total_params=total,
                active_params=_active_params(model, total),
                embedding_params=sum({id(p): p.numel() for p in _peer_embeddings(model)}.values()),
            )
        )
    return peers


class HFRunner:
    """A transformers causal LM behind the bench's three jobs (see ``throughput.Runner``)."""

    def __init__(self, model: Any, device: str):
        self.module = model
        self.device = device
        # transformers 5.x renames forward's past_key_values to cache (the old name warns): use whichever it has
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, idx_BT: torch.Tensor) -> None:
        self.module(input_ids=idx_BT, use_cache=False, logits_to_keep=1)

    def decode(self, prompt_BT: torch.Tensor, n_tokens: int) -> float:
        from transformers import DynamicCache

        from dsmoe.bench.throughput import _sync

        cache = DynamicCache(config=self.module.config)

        def step(ids: torch.Tensor) -> torch.Tensor:
            out = self.module(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
            return out.logits[:, -1].argmax(-1)

        token = step(prompt_BT)
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(n_tokens):
            token = step(token[:, None])
        _sync(self.device)
        return time.perf_counter() - start

    def generate(self, prompt_BT: torch.Tensor, n_new: int) -> None:
        self.module.generate(
            prompt_BT, attention_mask=torch.ones_like(prompt_BT), max_new_tokens=n_new, do_sample=False
        )
