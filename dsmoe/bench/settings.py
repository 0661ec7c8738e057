"""What ``dsmoe bench`` measures, as plain settings: read by the command line without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from dsmoe.config import ConfigError
from dsmoe.inference.arguments import QUANTIZATIONS
from dsmoe.model.settings import KERNEL_IMPLS

DTYPE_NAMES = ("fp32", "bf16")
METRICS = ("input_tps", "output_tps_b1", "output_tps_b16", "latency_s")
SHAPES = ("table6", "llama")  # see dsmoe.bench.models
DECODE_MODES = ("eager", "compiled", "both")  # how our models decode (both: a "+compiled" row beside each)
PEERS = {"dense": "hf-llama", "ds-moe": "hf-olmoe"}  # our model -> the transformers model measured beside it


@dataclass
class BenchSettings:
    device: str = "cpu"
    dtype: str = "fp32"
    d_model: int = 1024
    n_layers: int = 4
    vocab_size: int = 4096  # keeps the LM head's share of the work small, as in the paper's 36-layer models
    input_len: int = 256
    memory_gb: float = 4.0  # budget for weights + activations of the input-throughput batch
    max_input_batch: int = 8  # cap on that batch (CPU time); raise it on a GPU
    decode_tokens: int = 512
    decode_prompt: int = 16
    decode_batches: tuple[int, ...] = (1, 16)
    latency_batch: int = 4
    latency_prompt: int = 256
    latency_new: int = 8
    mlp_tokens: int = 2048
    repeats: int = 3
    mlp_k: int = 4
    att_k: int | None = None
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (default: torch's choice)
    models: list[str] = field(default_factory=lambda: ["dense", "smoe", "ds-moe"])
    shape: str = "table6"  # table6: the paper's GELU/LayerNorm layout; llama: SwiGLU/RMSNorm, as the peers
    peers: bool = False  # also measure transformers' Llama and OLMoE at the same shape (needs shape "llama")
    # our models' decode steps: eager, compiled, or both side by side (DECODE_MODES)
    decode: str = "eager"
    # the buffer whose copy and read time this machine's memory bandwidth (larger than its caches)
    bandwidth_mb: int = 1024
    # also measure each of our models with its weights quantized ("int8"; rows "NAME+int8"), or not ("none")
    quantize: str = "none"
    # which implementation computes our models' sparse experts (dsmoe.model.settings.Kernels)
    kernels: str = "auto"

    def check(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"unknown dtype '{self.dtype}': choose one of {', '.join(DTYPE_NAMES)}")
        if self.device == "cuda" and not cuda_available():
            raise ConfigError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"unknown device '{self.device}': choose cpu or cuda")
        if self.shape not in SHAPES:
            raise ConfigError(f"unknown shape '{self.shape}': choose one of {', '.join(SHAPES)}")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"unknown decode mode '{self.decode}': choose one of {', '.join(DECODE_MODES)}")
        if self.quantize not in QUANTIZATIONS:
            raise ConfigError(
                f"unknown --quantize '{self.quantize}': choose one of {', '.join(QUANTIZATIONS)}"
            )
        if self.kernels not in KERNEL_IMPLS:
            raise ConfigError(f"unknown --kernels '{self.kernels}': choose one of {', '.join(KERNEL_IMPLS)}")
        if self.peers and self.shape != "llama":
            raise ConfigError(
                "--peers builds transformers' Llama and OLMoE, which have SwiGLU MLPs and RMSNorm: "
                "add --shape llama so that our models have the same layout"
            )
        if "dense" not in self.models:
            raise ConfigError("the benchmark needs the 'dense' model: ratios are relative to it")
        for name in (
            "input_len",
            "decode_tokens",
            "latency_batch",
            "latency_prompt",
            "latency_new",
            "repeats",
            "max_input_batch",
            "mlp_tokens",
            "decode_prompt",
            "d_model",
            "n_layers",
            "vocab_size",
            "bandwidth_mb",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise ConfigError(f"decode batches must be >= 1, got {self.decode_batches}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")

    @property
    def max_seq_len(self) -> int:
        return max(
            self.input_len, self.decode_prompt + self.decode_tokens, self.latency_prompt + self.latency_new
        )


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
