"""The one preparation pipeline of every entry point that runs a model (eval, sweep, tune, generate, serve, lm-eval,
export, bench, the demo): load -> plan -> quantize -> device -> products -> compile, in that order, in ``prepare``.

* load: a checkpoint's cheap checks first (its files, and its config against the weights' headers), then the plan
  is checked against the config, then the weights load (on the CPU); or a model already built;
* plan: the SparsePlan every forward is given (a plan, or a function of the config, e.g. reading flags);
* quantize: swap in int8 weight holders (``dsmoe.inference.quantize``), on CPUs where int8 is faster than fp32
  (``int8_pays``); elsewhere a warning says so and the weights stay fp32;
* device: the model moves there (and to ``dtype``), and the plan's kernel choice is fixed for it;
* products: on the CPU in fp32, oneDNN's products where they are faster than MKL's
  (``dsmoe.inference.onednn_products``), unless ``onednn=False``; with ``prepack=True`` their weights are also packed
  for batched products (faster from two rows, twice the weight memory);
* compile: whether decoding goes through the compiled step; int8 weights pay only there, so they imply it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsmoe.config import ModelConfig
from dsmoe.inference.onednn_products import is_prepacked, use_onednn
from dsmoe.inference.quantize import int8_pays
from dsmoe.inference.quantize import quantize as quantize_weights
from dsmoe.kernels import kernels_for
from dsmoe.model.plan import SparsePlan
from dsmoe.model.transformer import Transformer
from dsmoe.training.checkpoint import checkpoint_config, load_pretrained

PlanSource = SparsePlan | Callable[[ModelConfig], SparsePlan] | None


@dataclass
class Prepared:
    """A model ready to run: what to pass to its forward (``plan``) and to ``generate`` (``compile``)."""

    model: Transformer
    tokenizer: Any  # a tokenizers.Tokenizer, or None where the source has none
    plan: SparsePlan
    compile: bool
    quantize: str = "none"  # the weights' storage, as applied ("none" where int8 would not pay)
    prepacked: bool = False  # weights also packed by oneDNN for batched products, as applied

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg


def prepare(
    source: str | Path | Transformer,
    plan: PlanSource = None,
    *,
    quantize: str = "none",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    kernels: str = "auto",
    compile: bool = False,
    onednn: bool = True,
    prepack: bool = False,
    tokenizer: Any = None,
) -> Prepared:
    """``source``: a checkpoint folder, or a Transformer (with its ``tokenizer``). ``plan``: a SparsePlan, a function
    of the model's config that gives one, or None (as trained). ``kernels``: 'auto' (by device) or a path named (see
    ``dsmoe.model.settings.Kernels``); 'reference' keeps every product plain. Bad settings are found before any
    weight loads. ``prepack``: also pack the oneDNN products' weights (fp32 on the CPU; see
    ``dsmoe.inference.onednn_products``); elsewhere a warning says it does not apply."""
    if prepack and not onednn:
        raise ValueError("prepack packs the weights of oneDNN's products: it needs onednn=True")
    if isinstance(source, Transformer):
        model, cfg = source, source.cfg
    else:
        cfg = checkpoint_config(source)
    plan = plan(cfg) if callable(plan) else plan or SparsePlan.build(cfg)
    if not isinstance(source, Transformer):
        model, tokenizer = load_pretrained(source, dtype=dtype)
    if quantize == "int8" and not int8_pays(device):
        warnings.warn(
            f"--quantize int8: on this CPU ({torch.backends.cpu.get_cpu_capability()}) int8 products are slower "
            "than fp32 ones, so the weights stay fp32 (int8 pays on CPUs with AVX-512)",
            stacklevel=2,
        )
        quantize = "none"
    quantize_weights(model, quantize)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    plan = plan.with_kernels(kernels_for(torch.device(device), kernels).impl)
    if onednn and plan.kernels.impl == "cpu":
        use_onednn(model, prepack=prepack)
    if prepack and not is_prepacked(model):
        warnings.warn(
            "prepack applies to fp32 weights on the CPU with oneDNN's products; these are not, so nothing was packed",
            stacklevel=2,
        )
    return Prepared(
        model.eval(), tokenizer, plan, compile or quantize != "none", quantize, prepacked=is_prepacked(model)
    )
