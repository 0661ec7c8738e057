"""Data: tokenizers (``tokenizer``), corpus readers (``corpus``, ``formats``), real-data sources from package
registries (``sources``), the shard writer (``shards``) and the memory-mapped, resumable token loader (``loader``).
Import the submodule you need; this package imports nothing, so the command line starts fast."""
