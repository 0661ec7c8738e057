"""vLLM plugin (entry point ``vllm.general_plugins``): registers the DSMoEForCausalLM architecture of exported
folders with vLLM's model registry. vLLM is imported only when vLLM itself calls ``register()``; the model module is
named as a string, so vLLM imports it lazily in each worker. UNTESTED against a real vLLM (see vllm_model.py)."""

ARCHITECTURE = "DSMoEForCausalLM"
MODEL_CLASS = "dsmoe.hf.vllm_model:DSMoEForVLLM"


def register() -> None:
    try:
        from vllm import ModelRegistry
    except ImportError as err:
        raise ImportError(
            "dsmoe's vLLM plugin needs vLLM: pip install vllm (on a machine with a GPU)"
        ) from err
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
