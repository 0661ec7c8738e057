"""What ``dsmoe bench`` measures, as plain settings: read by the command line without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from dsmoe.config import ConfigError
from dsmoe.inference.arguments import QUANTIZATIONS
from dsmoe.model.settings import KERNEL_IMPLS

DTYPE_NAMES = ("fp32", "bf16")
SHAPES = ("table6", "llama")  # layouts, see dsmoe.bench.models
# The paper's model sizes: size -> presets of (Dense, SMoE partner, DS-MoE). Table 1's 1B/3B pair each DS-MoE with
# its SMoE; Table 1 has no 6B SMoE, so 6b's partner follows Table 6's rule (twice the MLP, 16 experts, top-2).
PAPER_SIZES: dict[str, tuple[str, str | None, str]] = {
    "1b": ("dense-1b", "smoe-1b", "ds-moe-1b"),
    "3b": ("dense-3b", "smoe-5b", "ds-moe-3b"),
    "6b": ("dense-6b", None, "ds-moe-6b"),
    "10b": ("dense-10b", "smoe-17b", "ds-moe-10b"),
    "14b": ("dense-14b", "smoe-25b", "ds-moe-14b"),
    "19b": ("dense-19b", "smoe-34b", "ds-moe-19b"),
}
# "toy": the 1,024-wide Table 6 shape of earlier runs (history; --d-model scales it)
SIZES = ("toy", *PAPER_SIZES)
TOY_WIDTH = 1024
DEFAULT_SIZE = "1b"


def size_width(size: str) -> int:
    """The model width of a paper size (the toy's default width for "toy")."""
    from dsmoe.config import PRESETS

    return TOY_WIDTH if size == "toy" else int(PRESETS[PAPER_SIZES[size][0]]["d_model"])


DECODE_MODES = ("eager", "compiled", "both")  # how our models decode (both: a "+compiled" row beside each)
PEERS = {"dense": "hf-llama", "ds-moe": "hf-olmoe"}  # our model -> the transformers model measured beside it


@dataclass
class BenchSettings:
    device: str = "cpu"
    dtype: str = "fp32"
    # SIZES: the paper's per-layer shapes, a few layers deep; "" -> "1b", or "toy" when d_model is given
    size: str = ""
    d_model: int | None = None  # the toy's width (default 1024); a named size has its own
    n_layers: int = 4
    vocab_size: int = 4096  # keeps the LM head's share of the work small, as in the paper's 36-layer models
    input_len: int = 256
    memory_gb: float = 8.0  # budget for weights + activations of the input-throughput batch
    max_input_batch: int = 4  # cap on that batch (CPU time); raise it on a GPU
    decode_tokens: int = 64
    decode_prompt: int = 16
    decode_batches: tuple[int, ...] = (1, 16, 64)
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
    # also measure each of our models on torch's own products (MKL; rows "NAME+mkl") beside oneDNN's (CPU, fp32)
    mkl: bool = False
    # also measure each of our models with oneDNN's weights packed for batched products (rows "NAME+prepack"; CPU, fp32)
    prepack: bool = False
    # which implementation computes our models' sparse experts (dsmoe.model.settings.Kernels)
    kernels: str = "auto"

    def __post_init__(self) -> None:
        if not self.size:
            self.size = DEFAULT_SIZE if self.d_model is None else "toy"
        if self.size in PAPER_SIZES and self.d_model not in (None, size_width(self.size)):
            raise ConfigError(
                f"--d-model {self.d_model} with --size {self.size}: a named size has its own width "
                f"({size_width(self.size)}); drop --d-model, or use --size toy to scale the toy shape"
            )
        if self.d_model is None:
            self.d_model = size_width(self.size) if self.size in SIZES else TOY_WIDTH

    @property
    def width(self) -> int:
        assert self.d_model is not None  # set by __post_init__
        return self.d_model

    def check(self) -> None:
        if self.size not in SIZES:
            raise ConfigError(f"unknown size '{self.size}': choose one of {', '.join(SIZES)}")
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
