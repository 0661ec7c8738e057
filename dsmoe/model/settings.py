"""How a layer picks experts at inference (a SparseSetting), as plain data: no tensors, so the command line can
read and check settings without importing torch. ``routing.py`` turns a setting into a Routing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dsmoe.config import ConfigError

STRATEGIES = ("dense", "topk", "threshold", "threshold_topk")


@dataclass(frozen=True)
class SparseSetting:
    """How one MoE layer picks experts at inference.

    dense: every expert, weighted by its score (what dense training computes).
    topk: the ``k`` highest-scoring experts.
    threshold: experts whose normalized probability S_i * N exceeds ``threshold`` (at least the top one).
    threshold_topk: the threshold gives a count per token; its mean over the batch, rounded half up, becomes K.
    normalize: rescale the selected scores to sum to one (off by default, as in the paper).
    """

    strategy: str = "dense"
    k: int | None = None
    threshold: float | None = None
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown sparse strategy '{self.strategy}': choose one of {', '.join(STRATEGIES)}"
            )
        bad_k = self.k is None or isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1
        if self.strategy == "topk" and bad_k:
            raise ConfigError(f"strategy 'topk' needs k >= 1 (got k={self.k!r}); pass --k")
        if self.strategy in ("threshold", "threshold_topk") and (
            self.threshold is None or not self.threshold > 0
        ):
            raise ConfigError(
                f"strategy '{self.strategy}' needs threshold > 0 (got {self.threshold!r}); "
                "the threshold compares S_i * N_experts, so 1.0 means 'above uniform'"
            )

    def describe(self) -> str:
        if self.strategy == "topk":
            return f"topk(k={self.k})"
        if self.strategy in ("threshold", "threshold_topk"):
            return f"{self.strategy}(eps={self.threshold})"
        return "dense"


DENSE = SparseSetting()


def trained_setting(regime: str, smoe_top_k: int) -> SparseSetting:
    """How a layer routes as trained: an SMoE its top-k, Dense and DS-MoE every expert. This is what every entry
    point runs when no sparse setting is given."""
    return SparseSetting("topk", k=smoe_top_k) if regime == "smoe" else DENSE


def describe_setting(setting: SparseSetting | Sequence[SparseSetting | None] | None) -> str:
    """A setting's label; None (no setting given) is "trained"; a list (one per layer) is "per-layer[...]"."""
    if setting is None:
        return "trained"
    if isinstance(setting, SparseSetting):
        return setting.describe()
    return "per-layer[" + ", ".join(describe_setting(s) for s in setting) + "]"


KERNEL_IMPLS = ("auto", "reference", "cpu", "sorted", "triton", "fused")


@dataclass(frozen=True)
class Kernels:
    """Which implementation computes the sparse experts, chosen once (where a model is prepared) and passed to the
    forward in its SparsePlan; ``dsmoe.kernels`` turns it, with the inputs' device and whether a gradient is needed,
    into the function that runs.

    impl: 'auto' picks by device (CPU: 'cpu', the path that suits the token count; CUDA: 'sorted', grouped
    products; anything else: 'reference'), or names one of them ('triton': the scatter-to-scatter kernels;
    'fused': the expert MLP in 4-6 Triton launches, not yet measured on a GPU).
    compiled: the forward is traced by torch.compile, so inference goes through the kernels' custom ops (a graph
    without breaks); eager, the implementation is called directly (an op's dispatch costs tens of microseconds).
    """

    impl: str = "auto"
    compiled: bool = False

    def __post_init__(self) -> None:
        if self.impl not in KERNEL_IMPLS:
            raise ConfigError(f"unknown kernels {self.impl!r}: choose one of {', '.join(KERNEL_IMPLS)}")


AUTO_KERNELS = Kernels()
