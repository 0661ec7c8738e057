"""Training tokens/s of tiny-dense, tiny-ds-moe and tiny-smoe in one process, steps interleaved so that all three
see the same machine load. Reproduce: .venv/bin/python benchmarks/train_throughput.py [--steps 12] [--compile]"""

import argparse
import json
import time

import torch

from dsmoe import Transformer, preset

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seq", type=int, default=256)
parser.add_argument("--compile", action="store_true")
args = parser.parse_args()

torch.manual_seed(0)
names = ["tiny-dense", "tiny-ds-moe", "tiny-smoe"]
models = {n: Transformer(preset(n)) for n in names}
if args.compile:
    for m in models.values():
        for block in m.blocks:
            block.compile()
optims = {n: torch.optim.AdamW(m.parameters(), lr=1e-3) for n, m in models.items()}
x = torch.randint(0, 8192, (args.batch, args.seq + 1))
seconds = {n: 0.0 for n in names}


def step(name):
    out = models[name](x[:, :-1], x[:, 1:])
    out.loss.backward()
    optims[name].step()
    optims[name].zero_grad(set_to_none=True)


for name in names:  # warm-up (and compilation)
    for _ in range(2):
        step(name)
for _ in range(args.steps):
    for name in names:
        start = time.perf_counter()
        step(name)
        seconds[name] += time.perf_counter() - start
tps = {n: args.steps * args.batch * args.seq / seconds[n] for n in names}
print(
    json.dumps(
        {
            "tokens_per_s": {n: round(v) for n, v in tps.items()},
            "ratio_vs_dense": {n: round(v / tps["tiny-dense"], 3) for n, v in tps.items()},
            "threads": torch.get_num_threads(),
            "compile": args.compile,
            "torch": torch.__version__,
        },
        indent=1,
    )
)
