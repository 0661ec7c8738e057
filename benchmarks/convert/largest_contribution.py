"""A largest-contribution heuristic for routing converted SmolLM2: for every token and layer, keep the MLP experts
whose actual contributions (computed densely, so this is no fast path) have the largest norms. It is a heuristic, not
a bound: the largest norms are not always the subset whose sum is closest to the full output, so a trained router
could in principle do better. It indicates how far routing alone can go with the experts left as they are.
Reproduce (about 9 minutes on 2 CPU cores):

    DSMOE_DATA_DIR=/tmp/dsdata HF_HUB_OFFLINE=1 python benchmarks/convert/largest_contribution.py \
        --out benchmarks/convert/largest_contribution.json
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import torch
from measure import held_out_documents, load_smollm2  # this folder: the script's own directory is on sys.path

from dsmoe.convert.from_hf import convert_model
from dsmoe.evaluation.text import evaluate_text
from dsmoe.kernels.reference import activate


def largest_contribution_forward(self, x_TD, mask_T, want_aux):
    """Sum of the ``self.keep_k`` largest expert contributions per token (router weights included)."""
    experts = self.experts
    h_TNF = activate(torch.einsum("td,nfd->tnf", x_TD, experts.w_in), experts.activation)
    contrib_TND = torch.einsum("tnf,nfd->tnd", h_TNF, experts.w_out) * self.router(x_TD)[..., None]
    top_TK = contrib_TND.norm(dim=-1).topk(self.keep_k, dim=-1).indices
    if self.meter is not None:
        self.meter.record(self.kind, self.layer_idx, torch.full_like(top_TK[:, 0], self.keep_k), mask_T)
    return contrib_TND.gather(1, top_TK[..., None].expand(-1, -1, contrib_TND.shape[-1])).sum(1), None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.375, 0.25])
    args = parser.parse_args()
    hf, tokenizer = load_smollm2()
    docs = held_out_documents(tokenizer, args.eval_tokens)
    base = convert_model(hf, 1, 1, max_seq_len=512).eval()
    dense = evaluate_text(base, tokenizer, docs, batch_size=2, max_len=512)["token_perplexity"]
    results = {"original (dense)": {"token_perplexity": dense}}
    print(f"original (dense)  token ppl {dense:8.2f}", flush=True)
    del base
    for n in args.experts:
        model = convert_model(hf, n, 1, max_seq_len=512).eval()
        for keep in args.keep:
            for block in model.blocks:
                block.mlp.keep_k = round(keep * n)
                block.mlp.forward = types.MethodType(largest_contribution_forward, block.mlp)
            r = evaluate_text(model, tokenizer, docs, batch_size=2, max_len=512)
            results[f"{n} experts, largest-contribution top-{round(keep * n)}"] = {
                "experts": n,
                "keep": keep,
                "token_perplexity": r["token_perplexity"],
                "tokens": r["tokens"],
            }
            print(
                f"{n:3d} experts  largest-contribution keep {keep:.3f}  token ppl {r['token_perplexity']:8.2f}",
                flush=True,
            )
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
