import json

from dsmoe.cli import main
from dsmoe.data import sources
from dsmoe.data.loader import TokenLoader
from dsmoe.data.tokenizer import save_tokenizer


def test_prepare_with_a_tokenizer_folder(tmp_path, small_tokenizer, make_docs, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": d}) + "\n" for d in make_docs(50)))
    save_tokenizer(small_tokenizer, tmp_path / "tok")
    rc = main(
        [
            "prepare",
            "--input",
            str(corpus),
            "--jsonl-field",
            "body",
            "--tokenizer",
            str(tmp_path / "tok"),
            "--out",
            str(tmp_path / "out"),
            "--val-fraction",
            "0.2",
            "--workers",
            "1",
        ]
    )
    assert rc == 0
    assert "train /" in capsys.readouterr().out
    loader = TokenLoader(tmp_path / "out", "train", batch_size=2, seq_len=8)
    assert next(loader)[0].shape == (2, 8)


def test_prepare_training_a_tokenizer(tmp_path, make_docs):
    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(make_docs(40)):
        (tmp_path / "docs" / f"{i}.txt").write_text(doc)
    assert (
        main(
            [
                "prepare",
                "--input",
                str(tmp_path / "docs"),
                "--train-tokenizer",
                "280",
                "--out",
                str(tmp_path / "out"),
                "--val-fraction",
                "0",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["vocab_size"] == 280 and index["documents"]["train"] == 40


def test_errors_are_printed_not_raised(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSMOE_DATA_DIR", str(tmp_path / "cache"))
    rc = main(
        [
            "prepare",
            "--input",
            str(tmp_path / "missing.txt"),
            "--tokenizer",
            "gpt2",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2
    assert "dsmoe: error: input" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # failed before fetching the tokenizer
    assert main(["data", "fetch", "nonesuch"]) == 2
    assert "unknown data source 'nonesuch'" in capsys.readouterr().err


def test_data_list_shows_sources_and_cache_state(tmp_path, capsys):
    (tmp_path / "sotu").mkdir()
    (tmp_path / "sotu" / "meta.json").write_text("{}")
    assert main(["data", "list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == len(sources.SOURCES) + len(sources.COMPOSITES)
    assert any(line.startswith("sotu") and "cached" in line for line in out.splitlines())
    assert any(line.startswith("prose") for line in out.splitlines())
    lines = out.splitlines()
    columns = {lines[i].index(source.description) for i, source in enumerate(sources.list_sources())}
    assert len(columns) == 1, "the descriptions of cached and uncached sources start in different columns"
