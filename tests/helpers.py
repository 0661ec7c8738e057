"""Shared test helpers (tests/ is on pytest's pythonpath)."""

import json

from dsmoe.config import ModelConfig


def small_config(regime: str = "dsmoe", **overrides) -> ModelConfig:
    """A few-thousand-parameter model that still has every feature: MoA with GQA, several MLP experts."""
    base = dict(
        d_model=32,
        n_layers=2,
        n_att_experts=4,
        n_heads_per_expert=2,
        head_dim=8,
        n_kv_heads=2,
        n_mlp_experts=8,
        d_expert=16,
        vocab_size=97,
        max_seq_len=64,
        regime=regime,
        alpha_att=1e-2,
        alpha_mlp=1e-2,
    )
    if regime == "dense":
        base.update(n_att_experts=1, n_heads_per_expert=8, n_mlp_experts=1, d_expert=128)
    if regime == "smoe":
        base.update(n_att_experts=1, n_heads_per_expert=8)
    base.update(overrides)
    return ModelConfig(**base)


def synthetic_corpus(n_docs: int = 120, seed: int = 0) -> list[str]:
    """Seeded sentences over a small vocabulary with some structure (frequent bigrams), for fast training tests."""
    import random

    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the old man", "my sister", "the committee", "a small bird", "the river"]
    verbs = ["sees", "follows", "builds", "remembers", "crosses", "sings to", "waits for"]
    objects = ["the bridge", "a red house", "the morning", "the market", "an open door", "the long road"]
    docs = []
    for _ in range(n_docs):
        sentences = [
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
            for _ in range(rng.randint(4, 12))
        ]
        docs.append(" ".join(s.capitalize() for s in sentences))
    return docs


def prepared_data(root, vocab_size: int = 384, seed: int = 0):
    """A prepared shard folder (train + val) made by the real pipeline from synthetic_corpus()."""
    from pathlib import Path

    from dsmoe.data.shards import prepare
    from dsmoe.data.tokenizer import train_bpe

    root = Path(root)
    docs = synthetic_corpus(seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    tok = train_bpe(docs, vocab_size)
    prepare([root / "docs.jsonl"], tok, root / "data", val_fraction=0.1, workers=1, progress=False)
    return root / "data"


def tiny_model_dict(regime: str = "dsmoe", vocab_size: int = 384) -> dict:
    return {**small_config(regime, vocab_size=vocab_size, max_seq_len=64).to_dict()}


def tiny_train_config(data_dir, out_dir, regime: str = "dsmoe", **overrides):
    """A TrainConfig that trains tiny_model_dict() on prepared_data() in about a second per step."""
    from dsmoe.training.config import TrainConfig

    values = dict(
        model=tiny_model_dict(regime),
        data=str(data_dir),
        out_dir=str(out_dir),
        seq_len=32,
        micro_batch_size=4,
        global_batch_tokens=256,
        total_tokens=256 * 8,
        warmup_tokens=512,
        lr=3e-3,
        min_lr=3e-4,
        log_every=1,
        eval_every=4,
        eval_batches=2,
        ckpt_every=2,
        keep_last=2,
        dtype="fp32",
    )
    values.update(overrides)
    return TrainConfig(**values)


def train_cli_args(data_dir, out_dir, total_steps: int = 8, keep_last: int = 2) -> list[str]:
    """`dsmoe train` key=value arguments for tiny_model_dict() on prepared_data(), checkpointing every 2 steps."""
    return [
        f"data={data_dir}",
        f"out_dir={out_dir}",
        f"model={json.dumps(tiny_model_dict())}",
        "seq_len=32",
        "micro_batch_size=4",
        "global_batch_tokens=256",
        f"total_tokens={256 * total_steps}",
        "warmup_tokens=512",
        "lr=3e-3",
        "log_every=1",
        "eval_every=0",
        "ckpt_every=2",
        f"keep_last={keep_last}",
        "dtype=fp32",
    ]


def model_file(checkpoint):
    """A checkpoint's (first) model weights file: a shard under model/ (training runs) or model.safetensors."""
    from pathlib import Path

    shards = sorted((Path(checkpoint) / "model").glob("*.safetensors"))
    return shards[0] if shards else Path(checkpoint) / "model.safetensors"


def run_train(args, nproc=None):
    """`dsmoe train ARGS` in a child process, under torchrun with ``nproc`` gloo processes when given."""
    import os
    import subprocess
    import sys

    cmd = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "dsmoe", "train"]
        if nproc
        else [sys.executable, "-m", "dsmoe", "train"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
