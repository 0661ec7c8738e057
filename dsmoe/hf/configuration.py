"""Hugging Face configuration of a DS-MoE model: every ModelConfig field, plus the sparse-inference settings.

The sparse settings are ``{att,mlp}_strategy`` / ``_k`` / ``_threshold`` and ``normalize_weights``. Each may be one
value for every layer or a list with one value per layer. A strategy of ``None`` keeps the layer's trained behaviour
(all experts for DS-MoE, top-k for SMoE). They can be changed at load time
(``from_pretrained(path, mlp_strategy="topk", mlp_k=4)``) or later with ``model.set_sparse(...)``.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.model.settings import SparseSetting

SPARSE_KEYS = (
    "att_strategy",
    "att_k",
    "att_threshold",
    "mlp_strategy",
    "mlp_k",
    "mlp_threshold",
    "normalize_weights",
)


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
        self.model_config()
        self.sparse_settings()

    @property
    def num_attention_heads(self) -> int:
        return self.n_att_experts * self.n_heads_per_expert

    def model_config(self) -> ModelConfig:
        """The dsmoe ModelConfig these fields describe (validated)."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})

    def sparse_settings(self) -> tuple:
        """(attention, MLP) settings in the form ``dsmoe.sparsify`` takes: None, one SparseSetting or a list."""
        return self._settings("att"), self._settings("mlp")

    def _settings(self, kind: str):
        values = {name: getattr(self, f"{kind}_{name}") for name in ("strategy", "k", "threshold")}
        lists = {name: v for name, v in values.items() if isinstance(v, (list, tuple))}
        for name, v in lists.items():
            if len(v) != self.n_layers:
                raise ConfigError(
                    f"{kind}_{name} has {len(v)} entries for a model with {self.n_layers} layers; "
                    "give one value for all layers or one per layer"
                )

        def one(strategy, k, threshold):
            if strategy is None:
                return None
            threshold = None if threshold is None else float(threshold)
            return SparseSetting(strategy, k=k, threshold=threshold, normalize=self.normalize_weights)

        if not lists:
            return one(values["strategy"], values["k"], values["threshold"])
        per_layer = [
            [v[i] if isinstance(v, (list, tuple)) else v for v in values.values()]
            for i in range(self.n_layers)
        ]
        return [one(*layer) for layer in per_layer]

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> DSMoEConfig:
        return cls(**cfg.to_dict(), **kwargs)
