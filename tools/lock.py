"""Lock-file chores for the Makefile: write a lock from a venv, report a venv's drift from a lock.

    python tools/lock.py freeze VENV_PYTHON OUT [USE]  # exact versions of everything VENV has, atomically
    python tools/lock.py drift LOCK VENV_PYTHON       # what VENV has that LOCK does not say

pip's own ``freeze`` does the resolving work; this only names, filters and compares its lines.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import tempfile


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: list[str]) -> dict[str, str]:
    """{canonical name: version} of the ``name==version`` lines."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonical(name)] = version.strip()
    return out


def frozen(python: str) -> list[str]:
    result = subprocess.run(
        [python, "-m", "pip", "freeze", "--all", "--exclude-editable", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    )
    return [line for line in result.stdout.splitlines() if "==" in line]


CONSTRAINTS = (
    "Used as pip constraints by `make test`, `make demo` and CI; pyproject.toml keeps the ranges for users."
)


def freeze(python: str, out: str, use: str = CONSTRAINTS) -> None:
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    header = [
        f"# Exact versions from a real resolve on {datetime.date.today()}, Python {version} (tools/lock.py freeze).",
        f"# {use}",
    ]
    text = "\n".join(header + sorted(frozen(python), key=str.lower)) + "\n"
    folder = os.path.dirname(os.path.abspath(out))
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, prefix=".lock-") as f:
        f.write(text)
    os.chmod(f.name, 0o644)
    os.replace(f.name, out)
    print(f"wrote {out}: {text.count(chr(10)) - len(header)} packages")


def drift(lock: str, python: str) -> None:
    with open(lock) as f:
        locked = pins(f.readlines())
    now = pins(frozen(python))
    changed = [
        f"  {name}: {locked.get(name, '(not locked)')} -> {now.get(name, '(gone)')}"
        for name in sorted(set(locked) | set(now))
        if locked.get(name) != now.get(name)
    ]
    print(f"{len(changed)} package(s) differ from {lock}" + (":" if changed else ""))
    print("\n".join(changed))


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["help"]
    if command == "freeze" and len(args) in (2, 3):
        freeze(*args)
    elif command == "drift" and len(args) == 2:
        drift(*args)
    else:
        sys.exit(__doc__)
