"""``DSMoEForCausalLM``: the project's own ``Transformer`` behind Hugging Face's ``PreTrainedModel`` and
``GenerationMixin`` interfaces. No second implementation: the wrapper holds ``self.model = Transformer(cfg)`` and
adapts inputs (labels, attention mask, ``DynamicCache``) and outputs.

Padding: ``attention_mask`` (over cached and new tokens, as ``generate`` passes it) becomes the model's key mask, so
left padding, and therefore batched ``generate`` / ``pipeline`` over prompts of different lengths, gives each prompt
the tokens it would get alone. Rotary positions count real tokens only, exactly as transformers' ``position_ids``.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.hf.configuration import HF_FIELDS, SPARSE_KEYS, DSMoEConfig
from dsmoe.inference.generate import generate as decode
from dsmoe.inference.meter import ActiveMeter
from dsmoe.model.plan import SparsePlan
from dsmoe.model.rope import rope_tables
from dsmoe.model.settings_file import load_plan
from dsmoe.model.transformer import Transformer
from dsmoe.model.weights import check_weights, safetensors_shapes

# transformers 5.24 renamed the cache argument and output field ``past_key_values`` to ``cache``; ``generate`` passes
# and reads whichever name its release uses. We accept both names and return the cache under the output's own field.
CACHE_FIELD = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)}
    else "past_key_values"
)


# from_pretrained's arguments that say where its files are (passed on to cached_file)
HUB_ARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def check_weights_fit(name_or_path, kwargs: dict[str, Any]) -> None:
    """The check of ``from_pretrained`` before anything is built: the config it will use (``kwargs['config']`` or the
    folder's config.json) against the tensors in the folder's safetensors headers, found as transformers finds them
    (a local folder or the Hub cache)."""
    hub = {key: kwargs[key] for key in HUB_ARGS if key in kwargs}
    config = kwargs.get("config")
    if not isinstance(
        config, DSMoEConfig
    ):  # what transformers will build: config.json with the keyword fields
        fields = {f.name for f in dataclasses.fields(ModelConfig)} | set(SPARSE_KEYS)
        given = {key: value for key, value in kwargs.items() if key in fields}
        config = DSMoEConfig.from_pretrained(config or name_or_path, **hub, **given)
    index = cached_file(
        name_or_path, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **hub
    )
    if index is not None:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        files = [str(cached_file(name_or_path, shard, **hub)) for shard in shards]  # raises if one is missing
    else:
        single = cached_file(
            name_or_path, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub
        )
        if single is None:
            return  # no safetensors: transformers says what it lacks
        files = [single]
    check_weights(
        config.model_config(),
        safetensors_shapes(files),
        f"{name_or_path}: config.json and the weights",
        prefix=DSMoEForCausalLM.base_model_prefix + ".",
    )


class HFCacheAdapter:
    """dsmoe's cache interface (``layer(i).update(start, k, v) -> (k_all, v_all)``) over a transformers ``Cache``,
    whose ``update(k, v, layer_idx)`` appends and returns the layer's keys and values [B, n_kv, S, d]."""

    def __init__(self, cache: Cache):
        self.cache = cache

    def layer(self, i: int) -> HFLayerCache:
        return HFLayerCache(self.cache, i)


class HFLayerCache:
    def __init__(self, cache: Cache, layer: int):
        self.cache, self.index = cache, layer

    def update(self, start: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor):
        held = self.cache.get_seq_length(self.index)
        if held != start:
            raise ValueError(
                f"cache of layer {self.index} holds {held} positions but the input starts at {start}; "
                "pass the past_key_values returned by the previous call"
            )
        return self.cache.update(k_BHTd, v_BHTd, self.index)


@dataclasses.dataclass
class DSMoECausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE output plus the parts of ``loss``: ``loss = lm_loss + aux_loss``, where ``aux_loss`` is
    ``alpha_att * mi_att + alpha_mlp * mi_mlp`` (DS-MoE) or ``switch_loss_weight * switch`` (SMoE)."""

    lm_loss: torch.Tensor | None = None
    mi_att: torch.Tensor | None = None
    mi_mlp: torch.Tensor | None = None
    switch: torch.Tensor | None = None


class DSMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DSMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: DSMoEConfig):
        super().__init__(config)
        self.model = Transformer(config.model_config())
        self.post_init()
        # what the forward passes to the model: the plan of the config's sparse fields, and where it counts them
        self.sparse_plan: SparsePlan = config.plan()
        self.meter: ActiveMeter | None = None

    @torch.no_grad()
    def _init_weights(self, module):
        # Parameters are initialized by Transformer.reset_parameters (or loaded); only the RoPE tables, which are
        # not saved, need computing when transformers builds the model on the meta device.
        if isinstance(module, Transformer):
            cos, sin = rope_tables(module.cfg.head_dim, module.cfg.max_seq_len, module.cfg.rope_theta)
            hf_init.copy_(module.rope_cos, cos)
            hf_init.copy_(module.rope_sin, sin)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained``, after checking the config it will build (config.json with the keyword
        fields, or ``config=``) against the names and shapes in the weights' safetensors headers: a config that
        does not fit its weights is one ConfigError naming the tensors, before a model is built."""
        check_weights_fit(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    # --- sparse inference -------------------------------------------------------------------------------------------

    def set_sparse(self, meter: ActiveMeter | None = None, **settings) -> DSMoEForCausalLM:
        """Change sparse-inference settings (``att_strategy``, ``mlp_k``, ... as in DSMoEConfig) in ``self.config``
        and the plan the forward passes to the model; a kind given a new strategy drops its old k and threshold.
        Checked first: a bad setting changes nothing. ``meter``: an ``ActiveMeter`` the forward adds its router
        records to, or None."""
        fields = {key: getattr(self.config, key) for key in SPARSE_KEYS}
        for kind in ("att", "mlp"):
            if f"{kind}_strategy" in settings:
                fields.update({f"{kind}_k": None, f"{kind}_threshold": None})
        fields.update(settings)
        plan = SparsePlan.parse(fields, self.config.model_config(), HF_FIELDS)
        for key, value in fields.items():
            setattr(self.config, key, value)
        self.sparse_plan, self.meter = plan, meter
        return self

    def load_sparse_settings(self, path, meter: ActiveMeter | None = None) -> DSMoEForCausalLM:
        """Apply a per-layer settings file (written by ``dsmoe tune``), in place and in ``self.config`` (so
        ``save_pretrained`` keeps it); the file is checked against this model first."""
        plan = load_plan(path, self.config.model_config())
        return self.set_sparse(meter=meter, **({key: None for key in SPARSE_KEYS} | plan.fields()))

    @contextmanager
    def sparse(self, meter: ActiveMeter | None = None, **settings):
        """``with model.sparse(mlp_strategy="topk", mlp_k=2): ...`` -- settings for the block only."""
        old = {key: getattr(self.config, key) for key in SPARSE_KEYS}
        old_meter = self.meter
        self.set_sparse(meter=meter, **settings)
        try:
            yield self
        finally:
            self.set_sparse(meter=old_meter, **old)

    def generate(self, inputs=None, generation_config=None, *args, **kwargs):
        """transformers' ``generate``, after checking that the prompt and the new tokens fit in the model's
        ``max_seq_len`` (else it would fail at the first token past it, after all the work before)."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        config = generation_config if generation_config is not None else self.generation_config
        if ids is not None and hasattr(ids, "shape"):
            max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
            total = (
                ids.shape[-1] + max_new
                if max_new is not None
                else kwargs.get("max_length", config.max_length)
            )
            if total is not None and total > self.config.max_seq_len:
                raise ConfigError(
                    f"this model reads at most {self.config.max_seq_len} tokens, but the prompt has {ids.shape[-1]} "
                    f"and generation would reach {total}: lower max_new_tokens (or max_length), or shorten the prompt"
                )
        return super().generate(inputs, generation_config, *args, **kwargs)

    # --- compiled decoding -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def compiled_generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt + continuation ids through dsmoe's compiled decode step (one ``torch.compile`` graph per step over a
        static KV cache; see ``dsmoe.inference.generate.Decoder``), instead of ``generate``'s eager loop: greedy
        unless ``temperature`` > 0, left-padded prompts given by ``attention_mask``, and a row that emits
        ``eos_token_id`` padded with it. Greedy, it gives ``generate(..., do_sample=False)``'s tokens. The first call
        per batch size and length (in steps of 64) compiles; an ``ActiveMeter`` set with ``set_sparse`` counts it."""
        mask = None if attention_mask is None else attention_mask.bool()
        return decode(
            self.model,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=self.config.eos_token_id,
            generator=generator,
            prompt_mask_BT=mask,
            plan=self.sparse_plan,
            compile=True,
            meter=self.meter,
        )

    # --- forward ----------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Logits [B, T, V]. ``labels`` as in transformers (shifted inside). ``loss`` is what to train on, as in
        Mixtral: the LM cross-entropy plus the weighted router losses (``aux_loss``), so ``Trainer`` trains the
        routers too; ``lm_loss``, ``mi_att``, ``mi_mlp`` and ``switch`` are the unweighted parts. ``position_ids``
        are not read: the model derives the same positions from ``attention_mask`` (real tokens counted from 0), or
        from the cache length.
        ``cache`` and ``past_key_values`` are two names for one argument (transformers >= 5.24 passes ``cache``)."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("DSMoEForCausalLM takes input_ids; inputs_embeds is not supported")
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
        past_key_values = cache if cache is not None else past_key_values
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError(
                f"past_key_values must be a transformers Cache (e.g. DynamicCache), got "
                f"{type(past_key_values).__name__}; the legacy tuple format is not supported"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        targets = None
        if labels is not None:
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        last_only = isinstance(logits_to_keep, int) and logits_to_keep == 1 and labels is None
        adapter = HFCacheAdapter(past_key_values) if past_key_values is not None else None
        out = self.model(
            input_ids,
            targets,
            plan=self.sparse_plan,
            cache=adapter,
            start_pos=start,
            last_only=last_only,
            key_mask_BS=attention_mask,
        )
        if self.meter is not None:
            self.meter.update(out.routers)
        logits = out.logits
        if not last_only and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = logits[:, keep]
        aux = None if out.loss is None or out.lm_loss is None else out.loss - out.lm_loss
        # The cache field's name depends on the transformers release, so its type is only known at run time.
        cache_output: dict[str, Any] = {CACHE_FIELD: past_key_values if use_cache else None}
        return DSMoECausalLMOutput(
            loss=out.loss,
            aux_loss=aux,
            logits=logits,
            lm_loss=out.lm_loss,
            mi_att=out.mi_att,
            mi_mlp=out.mi_mlp,
            switch=out.switch,
            **cache_output,
        )
