"""Hugging Face configuration of a DS-MoE model: every ModelConfig field, plus the sparse-inference settings.

The sparse settings are ``{att,mlp}_strategy`` / ``_k`` / ``_threshold`` and ``normalize_weights``. Each may be one
value for every layer or a list with one value per layer. A strategy of ``None`` keeps the layer's trained behaviour
(all experts for DS-MoE, top-k for SMoE). They can be changed at load time
(``from_pretrained(path, mlp_strategy="topk", mlp_k=4)``) or later with ``model.set_sparse(...)``.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from dsmoe.config import ModelConfig
from dsmoe.model.plan import FIELDS, SparsePlan, Spelling

SPARSE_KEYS = FIELDS  # the config's sparse fields are the plan's flat fields, by the same names
HF_FIELDS = Spelling(where="config.json")


class DSMoEConfig(PretrainedConfig):
    model_type = "dsmoe"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len",
        "num_key_value_heads": "n_kv_heads",
    }

    # ModelConfig fields (defaults: a tiny DS-MoE; real models always carry their own values)
    d_model: int = 64
    n_layers: int = 2
    n_att_experts: int = 4
    n_heads_per_expert: int = 2
    head_dim: int = 8
    n_kv_heads: int = 2
    n_mlp_experts: int = 8
    d_expert: int = 32
    regime: str = "dsmoe"
    vocab_size: int = 512
    max_seq_len: int = 256
    alpha_att: float = 0.0
    alpha_mlp: float = 0.0
    smoe_top_k: int = 2
    switch_loss_weight: float = 0.01
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    # Sparse inference: one value for all layers, or a list with one value per layer
    att_strategy: str | list[str | None] | None = None
    att_k: int | list[int | None] | None = None
    att_threshold: float | list[float | None] | None = None
    mlp_strategy: str | list[str | None] | None = None
    mlp_k: int | list[int | None] | None = None
    mlp_threshold: float | list[float | None] | None = None
    normalize_weights: bool = False

    use_cache: bool = True
    tie_word_embeddings: bool = (
        False  # dsmoe ties through ``tie_embeddings`` inside the model, not through HF
    )
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.plan()

    @property
    def num_attention_heads(self) -> int:
        return self.n_att_experts * self.n_heads_per_expert

    def model_config(self) -> ModelConfig:
        """The dsmoe ModelConfig these fields describe (validated)."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})

    def plan(self) -> SparsePlan:
        """The sparse plan these fields describe (validated against the model)."""
        return SparsePlan.parse(
            {key: getattr(self, key) for key in SPARSE_KEYS}, self.model_config(), HF_FIELDS
        )

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> DSMoEConfig:
        return cls(**cfg.to_dict(), **kwargs)
