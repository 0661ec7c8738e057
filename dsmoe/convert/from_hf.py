"""A dense Llama-family Hugging Face model -> an exactly equivalent DS-MoE Transformer.

A dense FFN of width U = N * F is the sum of N groups of F hidden units. As DS-MoE MLP experts with a router that
gives every expert 1/N (zero router weights: softmax of equal logits) and output projections scaled by N, the layer
computes sum_e (1/N) * N * expert_e(x) = FFN(x). Attention heads are grouped the same way into MoA experts:
consecutive query heads, so an expert never straddles two key/value heads unless it owns them whole, and W_o is
scaled by N_att. Only float rounding separates the converted model from the original.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.convert.clustering import balanced_clusters
from dsmoe.model.transformer import Transformer

SUPPORTED_TYPES = (
    "llama",
)  # SmolLM2, TinyLlama, Llama 2/3 (without rope scaling) all report model_type llama


def load_hf_model(name_or_dir: str, gguf_file: str | None = None):
    """(float32 causal LM in eval mode, its tokenizers.Tokenizer or None) from a hub name or a local folder;
    ``gguf_file`` names a GGUF file inside that folder (dequantized to float by transformers)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ConfigError("converting needs transformers: pip install 'dsmoe[hf]'") from err
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file and not (Path(name_or_dir) / gguf_file).is_file() and Path(name_or_dir).is_dir():
        raise ConfigError(f"GGUF file {gguf_file} is not in {name_or_dir}")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as err:
        hint = " (GGUF files need: pip install 'dsmoe[convert]')" if gguf_file else ""
        raise ConfigError(f"cannot load a Hugging Face model from '{name_or_dir}'{hint}: {err}") from err
    return model.eval(), load_hf_tokenizer(name_or_dir, gguf_file)


def load_hf_tokenizer(name_or_dir: str, gguf_file: str | None = None):
    """The model's fast tokenizer as a ``tokenizers.Tokenizer`` (what dsmoe checkpoints store), or None."""
    from tokenizers import Tokenizer

    local = Path(name_or_dir) / "tokenizer.json"
    if local.is_file() and not gguf_file:
        return Tokenizer.from_file(str(local))
    try:
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoTokenizer.from_pretrained(name_or_dir, **kwargs).backend_tokenizer
    except (OSError, ValueError, AttributeError):
        return None


def _rope_theta(hf_cfg) -> float:
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    scaling = getattr(hf_cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", scaling.get("rope_type", "default"))
    if kind not in ("default", None):
        raise ConfigError(
            f"rope type '{kind}' is not supported: dsmoe implements plain RoPE (rope_type default)"
        )
    theta = params.get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    if theta is None:
        raise ConfigError("the Hugging Face config names no rope_theta")
    return float(theta)


def config_from_hf(
    hf_cfg,
    n_mlp_experts: int = 1,
    n_att_experts: int = 1,
    *,
    alpha_att: float = 0.0,
    alpha_mlp: float = 0.0,
    max_seq_len: int | None = None,
) -> ModelConfig:
    """The dsmoe ModelConfig of a Llama-family HF config split into the given numbers of experts."""
    if hf_cfg.model_type not in SUPPORTED_TYPES:
        raise ConfigError(
            f"model type '{hf_cfg.model_type}' is not supported; convert supports "
            f"{', '.join(SUPPORTED_TYPES)} (dense Llama-family models)"
        )
    if getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False):
        raise ConfigError("the model has attention or MLP biases; dsmoe models have none")
    if hf_cfg.hidden_act != "silu":
        raise ConfigError(f"hidden_act '{hf_cfg.hidden_act}' is not supported: Llama-family SwiGLU uses silu")
    n_heads, n_kv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // n_heads
    width = hf_cfg.intermediate_size
    if n_mlp_experts < 1 or width % n_mlp_experts:
        raise ConfigError(f"--mlp-experts {n_mlp_experts} must divide the FFN width {width}")
    if n_att_experts < 1 or n_heads % n_att_experts:
        raise ConfigError(f"--att-experts {n_att_experts} must divide the {n_heads} query heads")
    per_expert, per_kv = n_heads // n_att_experts, n_heads // n_kv
    if per_kv % per_expert and per_expert % per_kv:
        raise ConfigError(
            f"--att-experts {n_att_experts}: experts of {per_expert} heads would split the groups of "
            f"{per_kv} query heads that share a key/value head; choose a number of experts that "
            f"divides or is a multiple of {n_kv}"
        )
    dense = n_mlp_experts == 1 and n_att_experts == 1
    return ModelConfig(
        d_model=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_att_experts=n_att_experts,
        n_heads_per_expert=per_expert,
        head_dim=head_dim,
        n_kv_heads=n_kv,
        n_mlp_experts=n_mlp_experts,
        d_expert=width // n_mlp_experts,
        regime="dense" if dense else "dsmoe",
        vocab_size=hf_cfg.vocab_size,
        max_seq_len=max_seq_len or hf_cfg.max_position_embeddings,
        alpha_att=alpha_att,
        alpha_mlp=alpha_mlp,
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=float(hf_cfg.rms_norm_eps),
        rope_theta=_rope_theta(hf_cfg),
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
        init_std=float(getattr(hf_cfg, "initializer_range", 0.02)),
    )


@torch.no_grad()
def convert_state(
    hf_state: dict[str, torch.Tensor], cfg: ModelConfig, seed: int = 0, cluster_iterations: int = 10
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """dsmoe state dict from a Llama state dict, and per layer the FFN unit indices of each expert [N, F]."""

    def get(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise ConfigError(f"the Hugging Face checkpoint has no tensor '{name}'")
        return hf_state[name].float()

    n_att, n_mlp, d = cfg.n_att_experts, cfg.n_mlp_experts, cfg.d_model
    att_scale = float(n_att) if cfg.has_att_router else 1.0
    mlp_scale = float(n_mlp) if cfg.has_mlp_router else 1.0
    out = {"embed.weight": get("model.embed_tokens.weight"), "final_norm.weight": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")
    groups_per_layer = []
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "att_norm.weight"] = get(src + "input_layernorm.weight")
        out[dst + "mlp_norm.weight"] = get(src + "post_attention_layernorm.weight")
        out[dst + "att.wq"] = get(src + "self_attn.q_proj.weight").reshape(n_att, cfg.att_expert_dim, d)
        out[dst + "att.wo"] = (
            get(src + "self_attn.o_proj.weight").T.reshape(n_att, cfg.att_expert_dim, d) * att_scale
        )
        out[dst + "att.wk.weight"] = get(src + "self_attn.k_proj.weight")
        out[dst + "att.wv.weight"] = get(src + "self_attn.v_proj.weight")
        gate, up = get(src + "mlp.gate_proj.weight"), get(src + "mlp.up_proj.weight")
        down = get(src + "mlp.down_proj.weight")
        groups = balanced_clusters(gate, n_mlp, cluster_iterations, seed=seed + i)
        out[dst + "mlp.experts.w_in"] = torch.cat(
            [gate[groups], up[groups]], dim=1
        )  # [N, 2F, D]: gate, then up
        out[dst + "mlp.experts.w_out"] = down.T[groups] * mlp_scale
        if cfg.has_att_router:
            out[dst + "att.router.weight"] = torch.zeros(n_att, d)
        if cfg.has_mlp_router:
            out[dst + "mlp.router.weight"] = torch.zeros(n_mlp, d)
        groups_per_layer.append(groups)
    return {k: v.contiguous() for k, v in out.items()}, groups_per_layer


def convert_model(
    hf_model,
    n_mlp_experts: int = 1,
    n_att_experts: int = 1,
    *,
    alpha_att: float = 0.0,
    alpha_mlp: float = 0.0,
    max_seq_len: int | None = None,
    seed: int = 0,
) -> Transformer:
    """The DS-MoE (or, with one expert each, Dense) Transformer computing the same function as ``hf_model``."""
    cfg = config_from_hf(
        hf_model.config,
        n_mlp_experts,
        n_att_experts,
        alpha_att=alpha_att,
        alpha_mlp=alpha_mlp,
        max_seq_len=max_seq_len,
    )
    state, _ = convert_state(hf_model.state_dict(), cfg, seed=seed)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, assign=True, strict=True)
    from dsmoe.model.rope import rope_tables

    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    return model.eval()
