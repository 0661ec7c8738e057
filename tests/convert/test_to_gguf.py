"""dsmoe export --gguf: the llama.cpp architecture chosen for each model and setting, the file's contents, the rope
layout, Hugging Face's GGUF loader on the Dense file, and llama.cpp's greedy tokens against ours (where built)."""

import importlib.util
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import small_config, synthetic_corpus

from dsmoe.cli import main
from dsmoe.config import ConfigError
from dsmoe.convert.to_gguf import gguf_layout, gguf_vocab, interleave_rope_rows, write_gguf
from dsmoe.data.tokenizer import save_tokenizer, train_bpe
from dsmoe.inference.generate import generate
from dsmoe.model.plan import SparsePlan
from dsmoe.model.rope import apply_rope, rope_tables
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer
from dsmoe.training.checkpoint import write_checkpoint

gguf = pytest.importorskip("gguf", reason="GGUF export needs gguf (pip install 'dsmoe[convert]')")

VOCAB = 384
TOPK = SparseSetting("topk", k=2)
TOPK_NORMALIZED = SparseSetting("topk", k=3, normalize=True)


def llama_like(regime: str = "dsmoe", seed: int = 0, **overrides) -> Transformer:
    """A small SwiGLU/RMSNorm model with dense attention (4 heads of 8 = d_model) and 8 MLP experts. A wide
    initialisation keeps its next-token logits apart, so that greedy decoding does not hinge on float rounding."""
    torch.manual_seed(seed)
    values = dict(
        n_att_experts=1,
        n_heads_per_expert=4,
        n_kv_heads=2,
        n_mlp_experts=1 if regime == "dense" else 8,
        activation="swiglu",
        norm="rmsnorm",
        vocab_size=VOCAB,
        init_std=0.3,
        alpha_att=0.0,
    )
    return Transformer(small_config(regime, **{**values, **overrides})).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(synthetic_corpus(), VOCAB)


def plan_of(model: Transformer, mlp=None) -> SparsePlan:
    return SparsePlan.build(model.cfg, mlp=mlp)


@pytest.mark.parametrize(
    "regime, mlp, arch, used, shared",
    [
        ("dense", None, "llama", 0, False),
        ("dsmoe", TOPK, "deepseek", 2, True),
        ("dsmoe", None, "deepseek", 8, True),  # the trained dense mixture: every expert at its softmax score
        ("dsmoe", TOPK_NORMALIZED, "llama", 3, False),  # Mixtral's routing
    ],
)
def test_each_setting_gets_the_architecture_that_computes_it(regime, mlp, arch, used, shared):
    model = llama_like(regime)
    layout = gguf_layout(model.cfg, plan_of(model, mlp))
    assert (layout.arch, layout.n_expert_used, layout.zero_shared_expert) == (arch, used, shared)


@pytest.mark.parametrize(
    "model_overrides, mlp, message",
    [
        (dict(activation="gelu", norm="layernorm"), TOPK, "SwiGLU"),
        (dict(n_att_experts=2, n_heads_per_expert=2), TOPK, "attention experts"),
        ({}, SparseSetting("threshold", threshold=1.0), "fixed number of experts"),
        ({}, [TOPK, SparseSetting("topk", k=3)], "differs by layer"),
        (dict(head_dim=4), TOPK, "query heads x head_dim"),
    ],
)
def test_what_llama_cpp_cannot_compute_is_refused_with_the_reason(model_overrides, mlp, message):
    model = llama_like(**model_overrides)
    with pytest.raises(ConfigError, match=message):
        gguf_layout(model.cfg, plan_of(model, mlp))


def test_interleaved_rows_rotate_in_adjacent_pairs_as_ours_rotate_halves():
    """llama.cpp's 'normal' rope turns values (2i, 2i+1) of a head; ours turns (i, i + d/2). With the rows
    interleaved, its rotation of the projected vector is ours, reordered the same way."""
    n_heads, head_dim, d = 3, 8, 12
    w = torch.randn(n_heads * head_dim, d, dtype=torch.float64)
    x = torch.randn(5, d, dtype=torch.float64)
    cos, sin = (t[:5].double() for t in rope_tables(head_dim, 5, 1e4))
    ours = apply_rope((x @ w.t()).view(5, n_heads, head_dim), cos[:, None], sin[:, None])
    q = (x @ interleave_rope_rows(w, n_heads).t()).view(5, n_heads, head_dim // 2, 2)
    c, s = cos[:, None, : head_dim // 2], sin[:, None, : head_dim // 2]
    pairs = torch.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], dim=-1)
    expected = interleave_rope_rows(ours.reshape(5, -1).t(), n_heads).t().view_as(pairs)
    torch.testing.assert_close(pairs, expected)


def test_the_file_holds_the_models_tensors_and_vocabulary(tmp_path, tokenizer):
    model = llama_like()
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, plan_of(model, TOPK), path, dtype="f16")
    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    assert fields["general.architecture"].contents() == "deepseek"
    assert fields["deepseek.expert_used_count"].contents() == 2
    assert fields["deepseek.expert_shared_count"].contents() == 1
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == VOCAB and tokens[:3] == [tokenizer.id_to_token(i) for i in range(3)]
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.cfg
    down = tensors["blk.1.ffn_down_exps.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.F16
    assert list(down.shape) == [cfg.d_expert, cfg.d_model, cfg.n_mlp_experts]  # ggml order: innermost first
    torch.testing.assert_close(
        torch.from_numpy(down.data.astype("float32")),
        model.blocks[1].mlp.experts.w_out.detach().transpose(1, 2).half().float(),
    )
    assert (
        tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    )  # routers stay f32
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert not tensors["blk.0.ffn_down_shexp.weight"].data.any()  # the shared expert adds exactly nothing
    assert "output.weight" in tensors
    assert not list(tmp_path.glob(".*tmp"))


def test_padding_rows_past_the_tokenizer_are_unused_tokens(tokenizer):
    size = tokenizer.get_vocab_size()
    vocab = gguf_vocab(tokenizer, size + 5)
    assert vocab.tokens[-1] == f"[PAD{size + 4}]" and vocab.types[-1] == gguf.TokenType.UNUSED
    assert vocab.types[size - 1] == gguf.TokenType.NORMAL
    assert vocab.types[0] == gguf.TokenType.CONTROL  # <|endoftext|>, trained as a special token
    with pytest.raises(ConfigError, match="embedding only"):
        gguf_vocab(tokenizer, size - 1)


def test_hugging_face_reads_the_dense_file_as_llama_and_computes_our_logits(tmp_path, tokenizer):
    """An independent reader: transformers' GGUF loader undoes llama.cpp's row interleaving for Llama files."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'dsmoe[hf]')")
    model = llama_like("dense", tie_embeddings=True)
    write_gguf(model, tokenizer, plan_of(model), tmp_path / "dense.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="dense.gguf", dtype=torch.float32
    )
    ids = torch.tensor([tokenizer.encode("the cat sees the bridge").ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_export_gguf_from_the_command_line(tmp_path, tokenizer, capsys):
    model = llama_like()
    tokenizer_file = save_tokenizer(tokenizer, tmp_path / "tok")
    ckpt = write_checkpoint(tmp_path / "ckpt", model.state_dict(), model.cfg, tokenizer_file=tokenizer_file)
    out = tmp_path / "model.gguf"
    args = [
        "export",
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--gguf",
        "--strategy",
        "topk",
        "--k",
        "2",
    ]
    assert main(args) == 0
    assert "deepseek, 2 experts per token" in capsys.readouterr().out
    assert gguf.GGUFReader(out).fields["deepseek.expert_used_count"].contents() == 2
    assert main(args) == 2
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main([*args[:-4], "--strategy", "threshold", "--threshold", "1.0", "--overwrite"]) == 2
    assert "fixed number of experts" in capsys.readouterr().err
    assert gguf.GGUFReader(out).fields["deepseek.expert_used_count"].contents() == 2  # the old file is intact
    assert main([*args, "--normalize-weights", "--overwrite"]) == 0
    assert "architecture llama, 2 experts per token" in capsys.readouterr().out


def llama_cpp_completion() -> Path | None:
    """llama.cpp's llama-completion as benchmarks/llamacpp/build.py caches it for this CPU, or None."""
    script = Path(__file__).parents[2] / "benchmarks" / "llamacpp" / "build.py"
    spec = importlib.util.spec_from_file_location("llamacpp_build", script)
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    binary = build.binaries(build.DEFAULT_CACHE) / "llama-completion"
    return binary if binary.is_file() else None


COMPLETION = llama_cpp_completion()


@pytest.mark.skipif(
    COMPLETION is None,
    reason="needs llama.cpp, built once per CPU by benchmarks/llamacpp/build.py (15-30 min)",
)
@pytest.mark.parametrize(
    "regime, mlp", [("dense", None), ("dsmoe", TOPK), ("dsmoe", TOPK_NORMALIZED), ("dsmoe", None)]
)
def test_llama_cpp_decodes_our_greedy_tokens(tmp_path, tokenizer, regime, mlp):
    """Token for token: llama.cpp's greedy tokens come from the session file it saves with --prompt-cache-all
    (prompt and generated ids; its printed text drops bytes such as NUL). Its KV cache is kept f32 and its flash
    attention off, so that both engines compute in f32 throughout."""
    model = llama_like(regime)
    plan = plan_of(model, mlp)
    write_gguf(model, tokenizer, plan, tmp_path / "m.gguf")
    prompt, n_new = "the old man remembers", 24
    ids = tokenizer.encode(prompt).ids
    ours = generate(model, torch.tensor([ids]), n_new, plan=plan)[0].tolist()
    session = tmp_path / "session.bin"
    run = subprocess.run(
        [str(COMPLETION), "-m", str(tmp_path / "m.gguf"), "-p", prompt, "-n", str(n_new), "--temp", "0"]
        + ["-ctk", "f32", "-ctv", "f32", "-fa", "off", "-t", "1", "-no-cnv", "--ignore-eos", "--no-warmup"]
        + ["-c", "64", "--prompt-cache", str(session), "--prompt-cache-all"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    magic, _version, n = struct.unpack("<III", session.read_bytes()[:12])
    assert magic == 0x6767736E  # "ggsn": llama.cpp's session file
    theirs = list(struct.unpack(f"<{n}i", session.read_bytes()[12 : 12 + 4 * n]))
    assert theirs == ours
