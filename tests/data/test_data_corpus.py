import json

import pytest
import zstandard

from dsmoe.data.corpus import expand_inputs, read_documents, read_hf_dataset
from dsmoe.data.errors import DataError


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_text_files_are_one_document_each_and_folders_recurse(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first doc\n\nwith two paragraphs")
    (tmp_path / "sub" / "b.md").write_text("second")
    (tmp_path / "sub" / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.txt").write_text("hidden")
    assert list(read_documents([tmp_path])) == ["first doc\n\nwith two paragraphs", "second"]


def test_jsonl_and_zst_with_a_chosen_field(tmp_path):
    records = [{"text": "alpha", "body": "one"}, {"text": "beta", "body": "two"}]
    plain = _jsonl(tmp_path / "d.jsonl", records)
    zst = tmp_path / "d.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    assert list(read_documents([plain, zst])) == ["alpha", "beta", "alpha", "beta"]
    assert list(read_documents([zst], field="body")) == ["one", "two"]


def test_jsonl_missing_field_names_file_line_and_fix(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"content": "no text"}])
    with pytest.raises(
        DataError, match=r"d.jsonl, line 2: no 'text' field \(found: content\).*--jsonl-field"
    ):
        list(read_documents([path]))


def test_jsonl_bad_json_and_non_string(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl, line 2: not valid JSON"):
        list(read_documents([bad]))
    number = _jsonl(tmp_path / "n.jsonl", [{"text": 3}])
    with pytest.raises(DataError, match="field 'text' is int"):
        list(read_documents([number]))


def test_undecodable_bytes_name_file_line_and_encoding(tmp_path):
    path = tmp_path / "cp.txt"
    path.write_bytes("line one\nsmart \u2019quote\n".encode("cp1252"))
    with pytest.raises(
        DataError, match=r"cp.txt, line 2, column 7: byte 0x92 is not valid utf-8.*--encoding cp1252"
    ):
        list(read_documents([path]))
    assert list(read_documents([path], encoding="cp1252")) == ["line one\nsmart \u2019quote\n"]
    jsonl = tmp_path / "cp.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="cp.jsonl, line 2"):
        list(read_documents([jsonl]))


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(read_documents([tmp_path / "nope.txt"]))
    with pytest.raises(DataError, match="no input given"):
        list(read_documents([]))
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="corpus is empty"):
        list(read_documents([tmp_path / "empty.txt"]))
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="holds no"):
        expand_inputs([tmp_path / "only"])


def test_hf_save_to_disk_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip(
        "datasets", reason="the datasets package is an optional dependency (dsmoe[data])"
    )
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["x y", "z"], "n": [1, 2]}),
            "validation": datasets.Dataset.from_dict({"text": ["held"], "n": [3]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_dict({"content": ["solo"]}).save_to_disk(str(tmp_path / "single"))
    assert list(read_documents([tmp_path / "dd"])) == [
        "x y",
        "z",
    ]  # a datasets folder inside --input works too
    assert list(read_hf_dataset(tmp_path / "dd", split="validation")) == ["held"]
    assert list(read_documents(dataset=str(tmp_path / "single"), field="content")) == ["solo"]
    with pytest.raises(DataError, match="splits train, validation, not 'test'"):
        list(read_hf_dataset(tmp_path / "dd", split="test"))
    with pytest.raises(DataError, match="no 'text' column \\(columns: content\\)"):
        list(read_hf_dataset(tmp_path / "single"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="hub is offline"):
        list(read_hf_dataset("someone/some-corpus"))
