"""Atomic writes that honour the umask. A file or folder is built under a temporary name beside its target and
renamed into place, so it is whole or absent. ``tempfile`` creates those temporaries private (files 0600, folders
0700), as safetensors creates its files, so before the rename they get the mode that a plain ``open()`` or
``mkdir()`` would have given."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it can only be read by setting it, which briefly
    changes it for every thread of the process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def temp_folder(target: str | Path) -> Path:
    """A new empty folder beside ``target`` (its parents are created) to fill and then rename onto it. It stays
    private until ``apply_umask`` is called on it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def apply_umask(root: str | Path) -> None:
    """Give ``root`` and everything in it the mode ``mkdir()`` / ``open()`` give under the umask: ``tempfile``
    and safetensors' ``save_file`` create theirs private."""
    mask = umask()
    for path in [Path(root), *Path(root).rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write ``content`` (text as UTF-8) to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
