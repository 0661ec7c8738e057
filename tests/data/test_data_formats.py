import bz2
import gzip
import struct
import zlib

import numpy as np
import pytest

from dsmoe.data import formats
from dsmoe.data.errors import DataError


def test_brown_tags_stripped_and_paragraphs_kept():
    raw = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, it/pps didn't/do* ./.\n"
        "It/pps ended/vbd (/( at/in last/ap )/) ./.\n\n\n\tA/at new/jj paragraph/nn ?/.\n"
    )
    assert formats.brown_document(raw) == (
        'The jury said "no evidence", it didn\'t. It ended (at last).\n\nA new paragraph?'
    )


def write_sword_module(folder, stem, blocks, index_suffix="bzs"):
    """A SWORD block module: zlib blocks concatenated in the data file, (offset, compressed, size) records."""
    data, index = b"", b""
    for text in blocks:
        raw = text.encode("utf-8")
        packed = zlib.compress(raw)
        index += struct.pack("<III", len(data), len(packed), len(raw))
        data += packed
    (folder / f"{stem}.{index_suffix}").write_bytes(index)
    (folder / f"{stem}.{index_suffix[:-1]}z").write_bytes(data)
    return folder / f"{stem}.{index_suffix}"


SWORD_BOOK = (
    '<div osisID="Gen" type="book" sID="g1"/><title type="main">Genesis</title>'
    '<chapter n="1" osisID="Gen.1" sID="Gen.1"/><div sID="p1" type="x-p"/><w lemma="x">In</w> the '
    'beginning<note placement="foot">a footnote</note> God created &amp; made. <div eID="p1" type="x-p"/>'
    '<div sID="p2" type="x-p"/>Second paragraph here.<div eID="p2" type="x-p"/>'
    '<chapter n="2" osisID="Gen.2" sID="Gen.2"/>Thus the heavens were finished, all of them.'
)


def test_sword_blocks_split_by_chapter_and_clean(tmp_path):
    index = write_sword_module(tmp_path, "ot", ['<milestone type="x-importer" n="stamp"/>', SWORD_BOOK])
    assert list(formats.read_sword_blocks(index))[1] == SWORD_BOOK
    docs = [d["text"] for d in formats.sword_documents(index)]
    assert docs == [
        "Genesis\n\nIn the beginning God created & made.\n\nSecond paragraph here.",
        "Thus the heavens were finished, all of them.",
    ]


def test_sword_damaged_module_is_a_clear_error(tmp_path):
    index = write_sword_module(tmp_path, "nt", [SWORD_BOOK], "czs")
    index.write_bytes(index.read_bytes()[:-1])
    with pytest.raises(DataError, match="not a multiple of 12"):
        list(formats.read_sword_blocks(index))
    index = write_sword_module(tmp_path, "ot", [SWORD_BOOK])
    (tmp_path / "ot.bzz").write_bytes(b"short")
    with pytest.raises(DataError, match="points past the end"):
        list(formats.read_sword_blocks(index))


def test_r_lazyload_database_and_chapters(tmp_path):
    rdata = pytest.importorskip("rdata", reason="rdata is an optional dependency (dsmoe[data])")

    def serialize(value) -> bytes:
        return rdata.unparser.unparse_data(
            rdata.conversion.convert_python_to_r_data(value), file_format="xdr", file_type="rds"
        )

    book = np.array(
        [
            "EMMA",
            "",
            "By Jane Austen",
            "",
            "CHAPTER I",
            "",
            "Emma Woodhouse, handsome,",
            "clever.",
            "",
            "Second paragraph.",
            "",
            "CHAPTER II",
            "",
            "Mr. Weston was a native.",
        ]
    )
    blob = serialize(book)
    entry = struct.pack(">I", len(blob)) + zlib.compress(blob)  # R's framing: length, then zlib
    (tmp_path / "Rdata.rdb").write_bytes(entry)
    rdx = serialize(
        {
            "variables": {"emma": np.array([0, len(entry)], dtype=np.int32)},
            "references": {},
            "compressed": np.array([True]),
        }
    )
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(rdx))
    values = formats.read_r_lazyload(tmp_path / "Rdata.rdx")
    assert list(values) == ["emma"]
    chapters = list(formats.chapters_from_lines([str(x) for x in values["emma"]]))
    assert chapters == [
        "EMMA\n\nBy Jane Austen\n\nCHAPTER I\n\nEmma Woodhouse, handsome, clever.\n\nSecond paragraph.",
        "CHAPTER II\n\nMr. Weston was a native.",
    ]


WIKI = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<siteinfo><sitename>Wikipedia</sitename></siteinfo>
<page><title>Albedo</title><ns>0</ns><revision><text xml:space="preserve">'''Albedo''' is the [[reflection|reflected]]
fraction of light.&lt;ref&gt;A cited source.&lt;/ref&gt; {{Citation needed}}

== Terrestrial albedo ==
Snow has a high albedo.&lt;ref name="x"/&gt;</text></revision></page>
<page><title>AccessibleComputing</title><ns>0</ns><revision><text>#REDIRECT [[Computer accessibility]]</text>
</revision></page>
<page><title>Talk:Albedo</title><ns>1</ns><revision><text>A talk page.</text></revision></page>
</mediawiki>"""


def test_wiki_dump_skips_redirects_and_strips_markup(tmp_path):
    pytest.importorskip("mwparserfromhell", reason="mwparserfromhell is an optional dependency (dsmoe[data])")
    dump = tmp_path / "wiki.xml.bz2"
    dump.write_bytes(bz2.compress(WIKI.encode("utf-8")))
    docs = list(formats.wiki_documents(dump))
    assert docs == [
        {
            "title": "Albedo",
            "text": "Albedo is the reflected\nfraction of light.\n\nTerrestrial albedo\nSnow has a high albedo.",
        }
    ]


def test_wiki_malformed_dump(tmp_path):
    pytest.importorskip("mwparserfromhell", reason="mwparserfromhell is an optional dependency (dsmoe[data])")
    dump = tmp_path / "bad.xml.bz2"
    dump.write_bytes(bz2.compress(b"<mediawiki><page><title>x</title>"))
    with pytest.raises(DataError, match="not a well-formed MediaWiki XML dump"):
        list(formats.wiki_documents(dump))
