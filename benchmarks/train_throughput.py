"""Training tokens/s of tiny-dense, tiny-ds-moe and tiny-smoe, eager and compiled (``compile_blocks``, what
``compile: true`` applies in training), all in one process with their steps interleaved so that every variant sees
the same machine load. Each figure is the median over rounds of one timed step per variant.

Reproduce: .venv/bin/python benchmarks/train_throughput.py [--rounds 10] [--modes eager,compiled] [--out FILE]"""

import argparse
import json
import platform
import statistics
import time

import torch

from dsmoe import Transformer, preset
from dsmoe.training.transforms import compile_blocks

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=10)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seq", type=int, default=256)
parser.add_argument("--modes", default="eager,compiled")
parser.add_argument("--models", default="tiny-dense,tiny-ds-moe,tiny-smoe")
parser.add_argument("--out", help="also write the JSON result here")
args = parser.parse_args()

names, modes = args.models.split(","), args.modes.split(",")
variants = {}
for mode in modes:
    for name in names:
        torch.manual_seed(0)  # the same weights in both modes
        model = Transformer(preset(name))
        if mode == "compiled":
            compile_blocks(model)
        variants[f"{name}/{mode}"] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
x = torch.randint(0, 8192, (args.batch, args.seq + 1))


def step(model, optim):
    out = model(x[:, :-1], x[:, 1:])
    out.loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)


for variant in variants.values():  # warm-up (and compilation)
    for _ in range(2):
        step(*variant)
seconds: dict[str, list[float]] = {v: [] for v in variants}
for _ in range(args.rounds):
    for key, variant in variants.items():
        start = time.perf_counter()
        step(*variant)
        seconds[key].append(time.perf_counter() - start)
tokens = args.batch * args.seq
tps = {k: tokens / statistics.median(s) for k, s in seconds.items()}
spread = {k: round((max(s) - min(s)) / statistics.median(s), 3) for k, s in seconds.items()}
result = {
    "tokens_per_s": {k: round(v) for k, v in tps.items()},
    "ratio_vs_dense_same_mode": {
        k: round(v / tps[f"tiny-dense/{k.split('/')[1]}"], 3) for k, v in tps.items()
    },
    "ratio_compiled_vs_eager": {
        n: round(tps[f"{n}/compiled"] / tps[f"{n}/eager"], 3)
        for n in names
        if {"eager", "compiled"} <= set(modes)
    },
    "step_time_range_over_median": spread,
    "rounds": args.rounds,
    "batch_tokens": tokens,
    "threads": torch.get_num_threads(),
    "torch": torch.__version__,
    "machine": platform.platform(),
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
}
text = json.dumps(result, indent=1)
print(text)
if args.out:
    with open(args.out, "w") as f:
        f.write(text + "\n")
