"""Eager prefill and decode tokens/s of the bench's Llama-layout Dense and DS-MoE (width 1,024, 4 layers, top-4 of
32 experts), for the code of whichever dsmoe is on PYTHONPATH: before the inference redesign (#30, sparsify) or
after it (prepare + a plan). Best of 5 prefills of 2 x 256 tokens; 64 decode steps at batch 1 and 16.

    cd BEFORE_TREE && PYTHONPATH=. python PATH/TO/ab.py     # and the same in the after tree, taking turns
"""

from __future__ import annotations

import time

import torch

from dsmoe.bench.models import bench_models
from dsmoe.inference.generate import Decoder
from dsmoe.model.transformer import Transformer


def prepared(entry):
    """(model, forward keyword arguments, Decoder keyword arguments) under this tree's API."""
    model = Transformer(entry.cfg).eval()
    try:
        from dsmoe.inference.prepare import prepare
    except ImportError:  # before the redesign: the setting lives on the modules
        from dsmoe.inference.sparsify import sparsify

        return sparsify(model, att=entry.att, mlp=entry.mlp), {}, {}
    plan = prepare(model, entry.plan).plan
    return model, {"plan": plan}, {"plan": plan}


def main() -> None:
    torch.set_num_threads(2)
    result = {}
    for entry in bench_models(1024, 4, 4096, 512, shape="llama"):
        if entry.name == "smoe":
            continue
        torch.manual_seed(0)
        model, forward, decode = prepared(entry)
        x = torch.randint(0, 4096, (2, 256))
        with torch.inference_mode():
            model(x, last_only=True, **forward)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                model(x, last_only=True, **forward)
                times.append(time.perf_counter() - start)
            result[f"{entry.name} prefill tok/s"] = x.numel() / min(times)
            for batch in (1, 16):
                decoder = Decoder(model, batch, 16 + 64, **decode)
                token = decoder.prefill(torch.randint(0, 4096, (batch, 16))).argmax(-1)
                start = time.perf_counter()
                for _ in range(64):
                    token = decoder.step(token).argmax(-1)
                result[f"{entry.name} decode b{batch} tok/s"] = batch * 64 / (time.perf_counter() - start)
    print(result)


if __name__ == "__main__":
    main()
