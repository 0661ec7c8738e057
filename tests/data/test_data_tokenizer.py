import json
import os

import pytest
from tokenizers import Tokenizer

from dsmoe.data.errors import DataError
from dsmoe.data.tokenizer import (
    CODEGEN_WHITESPACE,
    EOS_TOKEN,
    add_codegen_whitespace,
    eos_id,
    fingerprint,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_bpe_files,
    train_bpe,
    vocab_size,
)


def test_train_bpe_is_byte_level_and_round_trips(small_tokenizer):
    assert vocab_size(small_tokenizer) == 300
    assert eos_id(small_tokenizer) == 0  # special tokens take the first ids
    text = "the lazy dog sings ünïcödé 🙂 and\ttabs\n  spaces"
    ids = small_tokenizer.encode(text).ids
    assert max(ids) < 300
    assert small_tokenizer.decode(ids) == text  # byte-level: nothing is unknown, nothing is lost
    assert small_tokenizer.encode(EOS_TOKEN).ids == [0]


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(DataError, match="at least 257"):
        train_bpe(["abc"], vocab_size=100)


def test_save_and_load_folder_and_file(tmp_path, small_tokenizer):
    path = save_tokenizer(small_tokenizer, tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    assert [p.name for p in (tmp_path / "tok").iterdir()] == ["tokenizer.json"]  # no temporary left behind
    for ref in (tmp_path / "tok", path, str(path)):
        loaded = load_tokenizer(ref)
        assert fingerprint(loaded) == fingerprint(small_tokenizer)
        assert loaded.encode("the quick fox").ids == small_tokenizer.encode("the quick fox").ids


def test_fingerprint_changes_with_vocabulary(small_tokenizer, make_docs):
    other = train_bpe(make_docs(200, seed=3), vocab_size=290)
    assert fingerprint(other) != fingerprint(small_tokenizer)


def _write_bpe_files(folder, tok: Tokenizer):
    model = json.loads(tok.to_str())["model"]
    (folder / "encoder.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def test_tokenizer_from_bpe_files_matches_the_trained_model(tmp_path, small_tokenizer):
    _write_bpe_files(tmp_path, small_tokenizer)
    rebuilt = tokenizer_from_bpe_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    text = "the quick brown fox, 1999 rivers"
    assert rebuilt.encode(text).ids == small_tokenizer.encode(text).ids
    assert (
        load_tokenizer(tmp_path).encode(text).ids == small_tokenizer.encode(text).ids
    )  # folder of BPE files


def test_codegen_whitespace_tokens_follow_the_base_vocab_longest_first(small_tokenizer):
    tok = add_codegen_whitespace(Tokenizer.from_str(small_tokenizer.to_str()))
    base = vocab_size(small_tokenizer)
    assert vocab_size(tok) == base + 38
    assert tok.token_to_id(" " * 31) == base and tok.token_to_id(" " * 2) == base + 29
    assert tok.token_to_id("\t" * 9) == base + 30 and tok.token_to_id("\t" * 2) == base + 37
    assert CODEGEN_WHITESPACE[0] == " " * 31
    ids = tok.encode("        x").ids  # eight spaces are one token
    assert ids[0] == tok.token_to_id(" " * 8)
    assert tok.decode(ids) == "        x"


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="neither tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match="not a `tokenizers` tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(DataError, match="not an existing file or folder"):
        load_tokenizer("no-such-tokenizer")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set.*pass the folder"):
        load_tokenizer("Salesforce/codegen-350M-mono")


def test_eos_id_missing_is_a_clear_error():
    tok = train_bpe(["hello world"] * 10, vocab_size=260, special=[])
    with pytest.raises(DataError, match="no end-of-document token"):
        eos_id(tok)


@pytest.mark.slow
def test_real_gpt2_and_codegen_tokenizers(tmp_path):
    from dsmoe.data.tokenizer import codegen_tokenizer, gpt2_tokenizer

    data_dir = os.environ.get("DSMOE_DATA_DIR") or tmp_path
    gpt2 = gpt2_tokenizer(data_dir)
    assert vocab_size(gpt2) == 50257 and eos_id(gpt2) == 50256
    assert gpt2.encode("Hello world").ids == [15496, 995]  # OpenAI GPT-2's ids
    assert gpt2.encode(" Hello<|endoftext|>").ids == [18435, 50256]
    codegen = codegen_tokenizer(data_dir)
    assert vocab_size(codegen) == 50295
    assert codegen.encode("def f():\n    return 1").ids[-3] == codegen.token_to_id("    ")
