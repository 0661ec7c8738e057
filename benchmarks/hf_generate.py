"""Greedy decoding through the Hugging Face wrapper (GenerationMixin + DynamicCache) vs dsmoe's own generate
(preallocated KVCache), same weights, same process; prints the ratio. Outputs are checked token-identical first.

    PYTHONPATH=. .venv/bin/python benchmarks/hf_generate.py [--preset tiny-ds-moe] [--new 64] [--repeats 5]
"""

import argparse
import platform
import statistics
import time

import torch

from dsmoe.config import preset
from dsmoe.hf import DSMoEConfig, DSMoEForCausalLM
from dsmoe.inference.generate import generate
from dsmoe.model.transformer import Transformer


def median_seconds(fns, repeats: int) -> list[float]:
    """Median wall time of each function; runs alternate so that load from other processes hits both alike."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny-ds-moe")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mlp-k", type=int, default=None, help="topk for the MLP experts (default: dense)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = preset(args.preset)
    sparse = {"mlp_strategy": "topk", "mlp_k": args.mlp_k} if args.mlp_k else {}
    wrapped = DSMoEForCausalLM(DSMoEConfig.from_model_config(cfg, **sparse)).eval()
    native = Transformer(cfg).eval()
    native.load_state_dict(wrapped.model.state_dict())
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt))

    def hf():
        return wrapped.generate(
            prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0
        )

    def ours():
        return generate(native, prompt, args.new, plan=wrapped.sparse_plan)

    with torch.inference_mode():
        assert torch.equal(hf(), ours()), "HF and native greedy outputs differ"
        t_ours, t_hf = median_seconds([ours, hf], args.repeats)
    tokens = args.batch * args.new
    print(
        f"{args.preset} ({cfg.total_params / 1e6:.1f}M params), batch {args.batch}, prompt {args.prompt}, "
        f"{args.new} new tokens, mlp {'topk k=' + str(args.mlp_k) if args.mlp_k else 'dense'}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(f"dsmoe generate : {tokens / t_ours:8.1f} tok/s ({t_ours * 1e3:.0f} ms)")
    print(f"HF generate    : {tokens / t_hf:8.1f} tok/s ({t_hf * 1e3:.0f} ms)")
    print(f"HF / dsmoe time ratio: {t_hf / t_ours:.2f}")


if __name__ == "__main__":
    main()
