"""Readers for the file formats the packaged corpora come in, each turning raw files into documents (dicts with a
`text` key): Brown's POS-tagged text, SWORD zText/zCom block modules, R lazy-load databases, MediaWiki XML dumps."""

from __future__ import annotations

import bz2
import gzip
import html
import re
import struct
import warnings
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from pathlib import Path

from dsmoe.data.errors import DataError

Doc = dict[str, str]

# --- Brown corpus: `word/tag` tokens, one sentence per line, blank lines between paragraphs ----------------------

_NO_SPACE_BEFORE = re.compile(r" ([.,;:?!)\]}%]|'s\b|'t\b|n't\b|'re\b|'ll\b|'ve\b|'d\b|'m\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def strip_brown_tags(line: str) -> str:
    """`The/at jury/nn ./.` -> `The jury.`: drop each token's tag and undo the tokenizer's spacing."""
    words = [token.rsplit("/", 1)[0] if "/" in token else token for token in line.split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    text = _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", text))
    return re.sub(r'" (.*?) "', r'"\1"', text)


def brown_document(raw: str) -> str:
    """A Brown text as paragraphs of detagged sentences, separated by blank lines."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        sentences = [strip_brown_tags(line) for line in block.splitlines() if line.strip()]
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


# --- SWORD zText / zCom modules -----------------------------------------------------------------------------------

_OSIS_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_OSIS_PARAGRAPH = re.compile(r"<(?:div|p|lg|l)\b[^>]*\b(?:sID|eID)=[^>]*/>|</?(?:p|lg)\b[^>]*>|<lb\b[^>]*/>")
_OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_OSIS_TAG = re.compile(r"<[^>]+>")
_OSIS_CHAPTER = re.compile(r"<chapter\b[^>]*\bsID=[^>]*/>")


def read_sword_blocks(index_path: Path) -> Iterator[str]:
    """The decompressed blocks of a SWORD module file pair: the index (`.bzs`/`.czs`) holds little-endian
    (offset, compressed size, uncompressed size) uint32 records into the data file (`.bzz`/`.czz`) of zlib blocks."""
    data_path = index_path.with_suffix(index_path.suffix[:-1] + "z")
    index, data = index_path.read_bytes(), data_path.read_bytes()
    if len(index) % 12:
        raise DataError(
            f"{index_path} is not a SWORD block index: its size {len(index)} is not a multiple of 12"
        )
    for number, (offset, compressed, uncompressed) in enumerate(struct.iter_unpack("<III", index)):
        if offset + compressed > len(data):
            raise DataError(
                f"{index_path}: block {number} points past the end of {data_path}; the module is damaged"
            )
        block = zlib.decompress(data[offset : offset + compressed])
        if len(block) != uncompressed:
            raise DataError(
                f"{index_path}: block {number} inflates to {len(block)} bytes, not {uncompressed}"
            )
        yield block.decode("utf-8")


def osis_to_text(markup: str) -> str:
    """Plain text from OSIS markup: footnotes dropped, titles and paragraphs on their own lines, entities unescaped."""
    text = _OSIS_NOTE.sub(" ", markup)
    text = _OSIS_TITLE.sub(lambda m: f"\n\n{m.group(1)}\n\n", text)
    text = _OSIS_PARAGRAPH.sub("\n\n", text)
    text = html.unescape(_OSIS_TAG.sub("", text))
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


def sword_documents(index_path: Path) -> Iterator[Doc]:
    """One document per chapter: blocks are split at OSIS chapter milestones (a book's preamble stays with its first
    chapter; a block without any milestone stays whole)."""
    for block in read_sword_blocks(index_path):
        starts = [m.start() for m in _OSIS_CHAPTER.finditer(block)][1:]
        pieces = [block[a:b] for a, b in zip([0, *starts], [*starts, len(block)], strict=True)]
        for piece in pieces:
            text = osis_to_text(piece)
            if len(text.split()) >= 3:  # skip importer stamps and bare headings
                yield {"text": text}


# --- R lazy-load databases (`Rdata.rdx` + `Rdata.rdb`) --------------------------------------------------------------


def _inflate_r(blob: bytes, where: str) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    # R's own framing: a 4-byte big-endian uncompressed length, then a zlib stream.
    try:
        return zlib.decompress(blob[4:])
    except zlib.error as err:
        raise DataError(f"{where}: not a zlib- or gzip-compressed R object ({err})") from None


def read_r_lazyload(rdx_path: Path) -> dict[str, object]:
    """Every variable of an R lazy-load database, converted by the `rdata` package (strings -> numpy arrays)."""
    try:
        import rdata
    except ImportError as err:
        raise DataError("reading R data needs the rdata package: pip install 'dsmoe[data]'") from err
    rdb = rdx_path.with_suffix(".rdb").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare serialization has no RDS/RDA header
        index = rdata.conversion.convert(
            rdata.parser.parse_data(_inflate_r(rdx_path.read_bytes(), str(rdx_path)))
        )
        values = {}
        for name, (offset, length) in index["variables"].items():
            raw = _inflate_r(rdb[int(offset) : int(offset) + int(length)], f"{rdx_path} variable {name}")
            values[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return values


def chapters_from_lines(lines: list[str], pattern: str = r"^\s*chapter\b") -> Iterator[str]:
    """Split a book given as lines at chapter headings; lines become paragraphs at blank lines."""
    heading = re.compile(pattern, re.I)
    chapter: list[str] = []
    for line in [*lines, "CHAPTER"]:
        if heading.match(line) and any(heading.match(s) for s in chapter):  # a title page joins chapter one
            paragraphs = (" ".join(p.split()) for p in "\n".join(chapter).split("\n\n"))
            yield "\n\n".join(p for p in paragraphs if p)
            chapter = []
        chapter.append(line)


# --- MediaWiki XML dumps ----------------------------------------------------------------------------------------

_WIKI_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref>", re.S | re.I)


def wiki_documents(dump_path: Path) -> Iterator[Doc]:
    """Articles of a (bz2-compressed) MediaWiki XML dump as plain text: redirects skipped, markup stripped."""
    try:
        import mwparserfromhell
    except ImportError as err:
        raise DataError("reading a Wikipedia dump needs mwparserfromhell: pip install 'dsmoe[data]'") from err
    opener = bz2.open if dump_path.suffix == ".bz2" else open
    with opener(dump_path, "rb") as stream:
        try:
            for _, element in ET.iterparse(stream, events=("end",)):
                if element.tag.rsplit("}", 1)[-1] != "page":
                    continue
                title = _child_text(element, "title")
                namespace = _child_text(element, "ns") or "0"
                revision = next((c for c in element if c.tag.endswith("revision")), None)
                wikitext = _child_text(revision, "text") if revision is not None else ""
                element.clear()
                if namespace != "0" or wikitext.lstrip().upper().startswith("#REDIRECT"):
                    continue
                wikitext = _WIKI_REF.sub("", wikitext)  # footnote contents would run into the sentence
                text = _tidy_wiki_text(mwparserfromhell.parse(wikitext).strip_code())
                if text:
                    yield {"title": title, "text": text}
        except ET.ParseError as err:
            raise DataError(f"{dump_path} is not a well-formed MediaWiki XML dump ({err})") from None


def _child_text(element: ET.Element, name: str) -> str:
    child = next((c for c in element if c.tag.rsplit("}", 1)[-1] == name), None)
    return (child.text or "") if child is not None else ""


def _tidy_wiki_text(text: str) -> str:
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
