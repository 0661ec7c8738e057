"""The one exception the data package raises for bad input; the CLI prints its message and exits with status 2."""

from __future__ import annotations

from dsmoe.config import ConfigError


class DataError(ConfigError):
    """A corpus, tokenizer, shard folder or data source is unusable; the message names the file or field and the fix."""
