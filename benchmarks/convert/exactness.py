"""Exactness of converting SmolLM2-135M-Instruct: max |logit difference| against the transformers model on 256
tokens of held-out Wikipedia, for the Dense-regime conversion and for DS-MoE splits. Reproduce:

    DSMOE_DATA_DIR=/tmp/dsdata HF_HUB_OFFLINE=1 python benchmarks/convert/exactness.py
"""

from __future__ import annotations

import json

import torch
from measure import load_smollm2  # this folder: the script's own directory is on sys.path

from dsmoe.convert.from_hf import convert_model
from dsmoe.data.corpus import read_documents
from dsmoe.data.sources import fetch_corpus


def main() -> None:
    hf, tokenizer = load_smollm2()
    doc = next(iter(read_documents(fetch_corpus("wikipedia"), field="text")))
    idx = torch.tensor(tokenizer.encode(doc).ids[:256])[None]
    with torch.no_grad():
        reference = hf(idx).logits
        result = {"tokens": idx.shape[1], "max_abs_logit": float(reference.abs().max())}
        for mlp, att in ((1, 1), (16, 3), (64, 9)):
            model = convert_model(hf, mlp, att, max_seq_len=512)
            result[f"mlp {mlp} x att {att}"] = float((model(idx).logits - reference).abs().max())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
