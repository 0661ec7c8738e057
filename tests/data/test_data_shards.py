import json
import warnings

import numpy as np
import pytest
from tokenizers import Tokenizer

from dsmoe.data.errors import DataError
from dsmoe.data.shards import MIN_VAL_DOCUMENTS, is_val_document, prepare, token_dtype
from dsmoe.data.tokenizer import fingerprint


def _corpus(tmp_path, docs):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def _read_split(out, index, split):
    dtype = np.dtype(index["dtype"])
    return np.concatenate(
        [np.fromfile(out / s["file"], dtype=dtype) for s in index["shards"][split]] or [np.zeros(0, dtype)]
    )


def test_prepare_writes_eos_separated_shards_index_and_tokenizer(tmp_path, small_tokenizer, make_docs):
    docs = make_docs(60)
    out = tmp_path / "shards"
    index = prepare(
        [_corpus(tmp_path, docs)],
        small_tokenizer,
        out,
        val_fraction=0.2,
        shard_tokens=500,
        workers=1,
        progress=False,
    )
    assert index["dtype"] == "uint16" and index["vocab_size"] == 300 and index["eos_id"] == 0
    assert index["tokenizer_sha256"] == fingerprint(Tokenizer.from_file(str(out / "tokenizer.json")))
    assert index["documents"]["train"] + index["documents"]["val"] == 60
    assert index["documents"]["val"] > 0
    assert json.loads((out / "index.json").read_text()) == index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "shards"]  # no temporary left
    split_of = {d: "val" if is_val_document(d, 0, 0.2) else "train" for d in docs}
    for split in ("train", "val"):
        shards = index["shards"][split]
        assert all(s["tokens"] == 500 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 500
        stream = _read_split(out, index, split)
        assert len(stream) == index["tokens"][split] == sum(s["tokens"] for s in shards)
        expected = [t for d in docs if split_of[d] == split for t in [*small_tokenizer.encode(d).ids, 0]]
        assert stream.tolist() == expected  # every document, in order, each followed by EOS


def test_workers_and_split_are_deterministic(tmp_path, small_tokenizer, make_docs):
    corpus = _corpus(tmp_path, make_docs(700))  # several batches of documents
    one = prepare([corpus], small_tokenizer, tmp_path / "one", val_fraction=0.1, workers=1, progress=False)
    two = prepare([corpus], small_tokenizer, tmp_path / "two", val_fraction=0.1, workers=2, progress=False)
    assert one == two
    for split in ("train", "val"):
        assert (_read_split(tmp_path / "one", one, split) == _read_split(tmp_path / "two", two, split)).all()
    other_seed = prepare(
        [corpus], small_tokenizer, tmp_path / "seed1", val_fraction=0.1, seed=1, workers=1, progress=False
    )
    assert (
        other_seed["documents"]["val"] != one["documents"]["val"]
        or not (
            _read_split(tmp_path / "seed1", other_seed, "val") == _read_split(tmp_path / "one", one, "val")
        ).all()
    )


def test_val_fraction_is_about_right():
    picked = sum(is_val_document(f"document number {i}", 0, 0.05) for i in range(4000))
    assert 150 < picked < 250
    assert not any(is_val_document(f"d{i}", 0, 0.0) for i in range(100))


def test_existing_output_and_bad_arguments(tmp_path, small_tokenizer, make_docs):
    corpus = _corpus(tmp_path, make_docs(5))
    (tmp_path / "taken").mkdir()
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        prepare([corpus], small_tokenizer, tmp_path / "taken", progress=False)
    with pytest.warns(UserWarning, match="no document fell into the val split"):
        prepare([corpus], small_tokenizer, tmp_path / "taken", overwrite=True, workers=1, progress=False)
    assert (tmp_path / "taken" / "index.json").is_file()
    with pytest.raises(DataError, match="val_fraction"):
        prepare([corpus], small_tokenizer, tmp_path / "x", val_fraction=1.0, progress=False)


def test_a_val_split_of_few_documents_says_which_fraction_holds_out_enough(
    tmp_path, small_tokenizer, make_docs
):
    corpus = _corpus(tmp_path, make_docs(200))
    with pytest.warns(UserWarning) as caught:
        index = prepare(
            [corpus], small_tokenizer, tmp_path / "small", val_fraction=0.02, workers=1, progress=False
        )
    assert 0 < index["documents"]["val"] < MIN_VAL_DOCUMENTS
    assert f"only {index['documents']['val']} document" in str(caught[0].message)
    assert "pass --val-fraction 0.05 or more to hold out about 10" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = prepare(
            [corpus], small_tokenizer, tmp_path / "enough", val_fraction=0.1, workers=1, progress=False
        )
    assert index["documents"]["val"] >= MIN_VAL_DOCUMENTS


def test_failure_midway_leaves_nothing_behind(tmp_path, small_tokenizer, make_docs):
    good = _corpus(tmp_path, make_docs(300))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match="bad.jsonl, line 2"):
        prepare([good, bad], small_tokenizer, tmp_path / "out", shard_tokens=100, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "corpus.jsonl"]


def test_empty_corpus_is_refused(tmp_path, small_tokenizer):
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="corpus is empty"):
        prepare([tmp_path / "blank.txt"], small_tokenizer, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, small_tokenizer, monkeypatch):
    import dsmoe.data.shards as shards

    monkeypatch.setattr(
        shards, "vocab_size", lambda tok: 100
    )  # pretend the vocabulary is smaller than its ids
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog")
    with pytest.raises(DataError, match="token id .* >= vocab size 100"):
        prepare([tmp_path / "a.txt"], small_tokenizer, tmp_path / "out", workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_dtype_by_vocabulary_size():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
