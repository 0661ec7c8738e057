"""A dsmoe model -> one GGUF file that llama.cpp runs (``dsmoe export --gguf``).

llama.cpp has no DS-MoE architecture, so the file is written as an architecture it has, and only where that
architecture computes exactly what the model computes under its sparse setting:

* a Dense model (one MLP expert) -> ``llama``;
* MLP experts run top-k with the router's softmax scores as weights, not renormalised (the paper's sparse
  inference; and the trained dense mixture, as top-N) -> ``deepseek`` (DeepSeek-MoE): softmax gating, top-k, no
  renormalisation. That architecture also has a shared expert, written as zeros so that it adds exactly nothing;
  llama.cpp still computes it, one expert's products per token more than the model needs;
* top-k with renormalised weights (``--normalize-weights``) -> ``llama`` with experts (Mixtral's routing).

Everything else is refused with the reason: the paper's GeLU/LayerNorm layout, attention experts (llama.cpp's
attention has no router scaling heads), threshold routing (llama.cpp takes one fixed number of experts per token),
settings that differ by layer. (``qwen2moe`` routes the same way with a shared expert of any width, but llama.cpp
computes its gate's sigmoid as silu(z)/z, which is NaN where z is exactly 0; ``olmoe`` normalises queries and keys.)

Both architectures rotate adjacent pairs of a head's values; dsmoe rotates its two halves (Hugging Face's layout),
so query and key rows are interleaved here, as llama.cpp's own converter does for Llama checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.files import umask
from dsmoe.model.plan import SparsePlan

if TYPE_CHECKING:  # torch, numpy and gguf load where a file is written: `dsmoe --help` imports this module
    import torch

    from dsmoe.model.transformer import Transformer

GGUF_TYPES = ("f32", "f16")
# tokenizer.json pre-tokenizers -> the llama.cpp pre-tokenizer that splits text the same way
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


@dataclass(frozen=True)
class GGUFLayout:
    """How a model is written: the llama.cpp architecture, experts per token (0: a dense MLP), and whether a zero
    shared expert pads it to that architecture."""

    arch: str
    n_expert_used: int
    zero_shared_expert: bool = False


def gguf_layout(cfg: ModelConfig, plan: SparsePlan) -> GGUFLayout:
    """The architecture that computes what a model of config ``cfg`` computes under ``plan``, or a ConfigError
    saying why none does (before any weight loads)."""
    if cfg.activation != "swiglu" or cfg.norm != "rmsnorm":
        raise ConfigError(
            f"llama.cpp runs SwiGLU experts with RMSNorm; this model is {cfg.activation}/{cfg.norm} (the paper's "
            "layout): export it for Hugging Face or vLLM instead (dsmoe export without --gguf)"
        )
    if cfg.n_att_experts > 1:
        raise ConfigError(
            f"this model has {cfg.n_att_experts} attention experts, whose heads a router scales; llama.cpp runs "
            "dense attention only. Export it without --gguf, or convert it with one attention expert"
        )
    if cfg.n_mlp_experts == 1:
        return GGUFLayout("llama", 0)
    settings = {plan.setting("mlp", i) for i in range(cfg.n_layers)}
    if len(settings) > 1:
        raise ConfigError(
            "llama.cpp runs one MLP setting in every layer; this plan differs by layer "
            f"({plan.describe('mlp')}): pass one --strategy for all layers"
        )
    (setting,) = settings
    if setting.strategy == "dense":
        return GGUFLayout("deepseek", cfg.n_mlp_experts, zero_shared_expert=True)
    if setting.strategy != "topk" or setting.k is None:
        raise ConfigError(
            f"llama.cpp takes a fixed number of experts per token; {setting.describe()} varies it: export with "
            "--strategy topk --k K (dsmoe eval --strategy topk finds the K that matches a threshold's perplexity)"
        )
    if setting.normalize:
        return GGUFLayout("llama", setting.k)
    if cfg.n_query_heads * cfg.head_dim != cfg.d_model:
        raise ConfigError(
            f"llama.cpp's deepseek architecture needs query heads x head_dim = d_model; this model has "
            f"{cfg.n_query_heads} x {cfg.head_dim} != {cfg.d_model}. Export with --normalize-weights (llama "
            "with experts), or without --gguf"
        )
    return GGUFLayout("deepseek", setting.k, zero_shared_expert=True)


def interleave_rope_rows(w_RD: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a query/key projection from rotate-halves order to rotate-adjacent-pairs order, per head: row
    2i + j of a head is its row j * head_dim/2 + i."""
    rows, d = w_RD.shape
    half = rows // n_heads // 2
    return w_RD.reshape(n_heads, 2, half, d).transpose(1, 2).reshape(rows, d)


def gguf_tensors(model: Transformer, layout: GGUFLayout) -> dict[str, torch.Tensor]:
    """name -> tensor in llama.cpp's naming, in PyTorch's [out, in] order (GGUF stores dimensions reversed)."""
    import gguf
    import torch

    T = gguf.MODEL_TENSOR

    def name(tensor, bid: int | None = None) -> str:
        return gguf.TENSOR_NAMES[tensor].format(bid=bid) + ".weight"

    cfg = model.cfg
    f = cfg.d_expert
    out: dict[str, Any] = {
        name(T.TOKEN_EMBD): model.embed.weight,
        name(T.OUTPUT_NORM): model.final_norm.weight,
    }
    if model.lm_head is not None:  # tied: llama.cpp reads token_embd for the head when output is absent
        out[name(T.OUTPUT)] = model.lm_head.weight
    for i, block in enumerate(model.block_list()):
        att, experts = block.att, block.mlp.experts
        out[name(T.ATTN_NORM, i)] = block.att_norm.weight
        out[name(T.ATTN_Q, i)] = interleave_rope_rows(att.wq.flatten(0, 1), cfg.n_query_heads)
        out[name(T.ATTN_K, i)] = interleave_rope_rows(att.wk.weight, cfg.n_kv_heads)
        out[name(T.ATTN_V, i)] = att.wv.weight
        out[name(T.ATTN_OUT, i)] = att.wo.flatten(0, 1).t()
        out[name(T.FFN_NORM, i)] = block.mlp_norm.weight
        gate_NFD, up_NFD = experts.w_in[:, :f], experts.w_in[:, f:]  # SwiGLU: gate half first
        down_NDF = experts.w_out.transpose(1, 2)
        if layout.n_expert_used == 0:
            out[name(T.FFN_GATE, i)], out[name(T.FFN_UP, i)] = gate_NFD[0], up_NFD[0]
            out[name(T.FFN_DOWN, i)] = down_NDF[0]
            continue
        router = block.mlp.router
        assert router is not None  # a model with more than one MLP expert has one
        out[name(T.FFN_GATE_INP, i)] = router.weight
        out[name(T.FFN_GATE_EXP, i)], out[name(T.FFN_UP_EXP, i)] = gate_NFD, up_NFD
        out[name(T.FFN_DOWN_EXP, i)] = down_NDF
        if layout.zero_shared_expert:
            zeros = torch.zeros(f, cfg.d_model, dtype=experts.w_in.dtype)
            out[name(T.FFN_GATE_SHEXP, i)], out[name(T.FFN_UP_SHEXP, i)] = zeros, zeros
            out[name(T.FFN_DOWN_SHEXP, i)] = zeros.t()
    return out


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str  # llama.cpp's name for the pre-tokenizer


def gguf_vocab(tokenizer: Any, n_vocab: int) -> GGUFVocab:
    """A byte-level BPE ``tokenizers.Tokenizer`` as llama.cpp's ``gpt2`` vocabulary of ``n_vocab`` entries (the
    embedding's rows; those past the tokenizer are unused padding)."""
    import gguf

    state = json.loads(tokenizer.to_str())
    model = state["model"]
    pre = _pre_tokenizer_name(state.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None or state.get("normalizer") is not None:
        raise ConfigError(
            "llama.cpp's GGUF vocabulary is written here for byte-level BPE tokenizers (GPT-2's pre-tokenizer, or "
            f"SmolLM's); this tokenizer is {model.get('type')} with pre-tokenizer {state.get('pre_tokenizer')} and "
            f"normalizer {state.get('normalizer')}: pass --tokenizer with a byte-level BPE tokenizer.json"
        )
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > n_vocab:
        raise ConfigError(f"the tokenizer has {size} entries but the model's embedding only {n_vocab}")
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        token = tokenizer.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return GGUFVocab(tokens, [int(t) for t in types], merges, pre)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    def is_a(step: dict | None, pattern: dict) -> bool:
        return step is not None and all(step.get(k) == v for k, v in pattern.items())

    if is_a(pre, _BYTE_LEVEL):
        return "gpt-2"
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else None
    if steps and len(steps) == 2 and is_a(steps[0], _DIGITS) and is_a(steps[1], _BYTE_LEVEL):
        return "smollm"  # each digit its own token, then GPT-2's split
    return None


def write_gguf(
    model: Transformer,
    tokenizer: Any,
    plan: SparsePlan,
    path: str | Path,
    *,
    dtype: str = "f32",
    name: str = "dsmoe",
) -> GGUFLayout:
    """Write ``model`` under ``plan`` to the GGUF file ``path`` (whole or not at all); returns the layout used.
    ``dtype``: the matrices' storage, f32 or f16 (norms and routers stay f32; quantize further with llama.cpp's
    ``llama-quantize``)."""
    import gguf
    import numpy as np
    import torch

    if dtype not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {dtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer; pass --tokenizer PATH/tokenizer.json")
    from dsmoe.data.tokenizer import eos_id

    cfg = model.cfg
    layout = gguf_layout(cfg, plan)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    tensors = gguf_tensors(model, layout)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, layout.arch)
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.d_expert)
        writer.add_head_count(cfg.n_query_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        if layout.n_expert_used:
            writer.add_expert_count(cfg.n_mlp_experts)
            writer.add_expert_used_count(layout.n_expert_used)
        if layout.zero_shared_expert:
            writer.add_expert_feed_forward_length(cfg.d_expert)
            writer.add_expert_shared_count(1)
            writer.add_leading_dense_block_count(0)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
        eos = eos_id(tokenizer)
        writer.add_bos_token_id(eos)  # dsmoe models start documents after an end-of-text token, never a BOS
        writer.add_eos_token_id(eos)
        writer.add_add_bos_token(False)
        for key, tensor in tensors.items():
            keep_f32 = tensor.dim() == 1 or key.endswith("ffn_gate_inp.weight")  # norms; routers pick in fp32
            storage = np.float32 if dtype == "f32" or keep_f32 else np.float16
            writer.add_tensor(
                key, tensor.detach().to(torch.float32).contiguous().numpy().astype(storage, copy=False)
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return layout
