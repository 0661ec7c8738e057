"""Corpus readers: each yields documents (str). Plain text files (one file = one document), JSONL with a text field,
the Pile's `.jsonl.zst`, folders (recursively), and Hugging Face `datasets` (a `save_to_disk` folder or a hub name)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from dsmoe.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
ZST_SUFFIXES = (".jsonl.zst",)
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _encoding_hint(encoding: str) -> str:
    other = "cp1252" if encoding.lower().replace("-", "") in ("utf8", "utf8sig") else "utf-8"
    return f"pass the file's real encoding (e.g. --encoding {other}) or re-encode it to {encoding}"


def _decode(raw: bytes, path: Path, encoding: str, first_line: int = 1) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}, column {column}: byte 0x{raw[err.start]:02x} is not valid {encoding}; "
            f"{_encoding_hint(encoding)}"
        ) from None


def read_text_file(path: str | Path, encoding: str = "utf-8") -> Iterator[str]:
    """The whole file as one document."""
    path = Path(path)
    yield _decode(path.read_bytes(), path, encoding)


def _jsonl_lines(path: Path, stream: io.BufferedIOBase, field: str, encoding: str) -> Iterator[str]:
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(_decode(raw, path, encoding, first_line=number))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({err.msg}); each line must be one JSON object"
            ) from None
        if not isinstance(record, dict) or field not in record:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{path}, line {number}: no '{field}' field (found: {keys}); choose the text field "
                "with --jsonl-field"
            )
        text = record[field]
        if not isinstance(text, str):
            raise DataError(f"{path}, line {number}: field '{field}' is {type(text).__name__}, not a string")
        yield text


def read_jsonl(path: str | Path, field: str = "text", encoding: str = "utf-8") -> Iterator[str]:
    """One document per line: the string in `field` of each JSON object."""
    path = Path(path)
    with path.open("rb") as f:
        yield from _jsonl_lines(path, f, field, encoding)


def read_jsonl_zst(path: str | Path, field: str = "text", encoding: str = "utf-8") -> Iterator[str]:
    """Zstandard-compressed JSONL (the Pile's format), decompressed as a stream."""
    try:
        import zstandard
    except ImportError as err:
        raise DataError(f"reading {path} needs the zstandard package: pip install 'dsmoe[data]'") from err
    path = Path(path)
    with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
        try:
            yield from _jsonl_lines(path, io.BufferedReader(stream), field, encoding)  # type: ignore[arg-type]
        except zstandard.ZstdError as err:
            raise DataError(f"{path}: corrupt zstandard stream ({err}); download the file again") from None


def is_hf_disk_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _HF_DISK_MARKERS)


def read_hf_dataset(name_or_dir: str | Path, field: str = "text", split: str = "train") -> Iterator[str]:
    """Documents from a Hugging Face dataset: a local `save_to_disk` folder, or a hub name (streamed; online only)."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "reading a Hugging Face dataset needs the datasets package: pip install 'dsmoe[data]'"
        ) from err
    path = Path(name_or_dir).expanduser()
    if path.exists():
        if not is_hf_disk_dataset(path):
            raise DataError(
                f"{path} is not a datasets.save_to_disk folder (no {' / '.join(_HF_DISK_MARKERS)})"
            )
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(
                    f"{path} has splits {', '.join(data)}, not '{split}'; choose one with --split"
                )
            data = data[split]
        where = str(path)
    else:
        if os.environ.get("HF_DATASETS_OFFLINE", "") in ("1", "true") or os.environ.get(
            "HF_HUB_OFFLINE", ""
        ) in ("1", "true"):
            raise DataError(
                f"dataset '{name_or_dir}' is not a local folder and the hub is offline "
                "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); save it with save_to_disk and pass the folder"
            )
        try:
            data = datasets.load_dataset(str(name_or_dir), split=split, streaming=True)
        except Exception as err:
            raise DataError(
                f"could not open dataset '{name_or_dir}' split '{split}' from the hub ({err})"
            ) from err
        where = f"dataset '{name_or_dir}'"
    columns = data.column_names
    if columns is not None and field not in columns:
        raise DataError(
            f"{where} has no '{field}' column (columns: {', '.join(columns)}); choose one with --jsonl-field"
        )
    for row in data:
        yield row[field]


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named directly, and the text/JSONL files under each folder (recursively, sorted, hidden ones skipped).
    A folder written by `datasets.save_to_disk` stays one input."""
    if not inputs:
        raise DataError("no input given; pass one or more files or folders with --input")
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        if path.is_file() or is_hf_disk_dataset(path):
            files.append(path)
            continue
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and _known_suffix(p)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not found:
            raise DataError(
                f"folder {path} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + ZST_SUFFIXES)} files"
            )
        files.extend(found)
    return files


def _known_suffix(path: Path) -> bool:
    return path.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + ZST_SUFFIXES)


def read_path(path: Path, field: str = "text", encoding: str = "utf-8") -> Iterator[str]:
    """Documents of one input, by its kind: zst JSONL, JSONL, a datasets folder, else a plain text file."""
    if path.is_dir():
        return read_hf_dataset(path, field)
    if path.name.endswith(ZST_SUFFIXES):
        return read_jsonl_zst(path, field, encoding)
    if path.name.endswith(JSONL_SUFFIXES):
        return read_jsonl(path, field, encoding)
    return read_text_file(path, encoding)


def read_documents(
    inputs: Sequence[str | Path] = (),
    *,
    field: str = "text",
    encoding: str = "utf-8",
    dataset: str | None = None,
    split: str = "train",
) -> Iterator[str]:
    """All non-empty documents of the inputs (files/folders) and of an optional Hugging Face dataset, in order.
    Raises DataError when the corpus holds no text at all."""
    sources: list[Iterable[str]] = (
        [read_path(p, field, encoding) for p in expand_inputs(inputs)] if inputs else []
    )
    if dataset is not None:
        sources.append(read_hf_dataset(dataset, field, split))
    if not sources:
        raise DataError("no input given; pass files or folders with --input, or --dataset")
    count = 0
    for source in sources:
        for text in source:
            if text.strip():
                count += 1
                yield text
    if count == 0:
        names = ", ".join(str(i) for i in inputs) + (f", dataset {dataset}" if dataset else "")
        raise DataError(f"the corpus is empty: no document with text in {names}")
