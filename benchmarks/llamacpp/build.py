"""Build llama.cpp's ``llama-bench``, ``llama-quantize``, ``llama-simple`` and ``llama-completion`` once, from the llama.cpp sources vendored
in PyPI's llama-cpp-python sdist (the only way to llama.cpp from the package registries), and cache them.

    python benchmarks/llamacpp/build.py [--cache ~/.cache/dsmoe/llama.cpp] [--jobs 2]

About 15 minutes on 2 cores (30 with one). ``-DGGML_NATIVE=ON`` compiles for this CPU, as a llama.cpp user would:
the binaries are cached per CPU flag set, so an AVX2 machine and an AVX-512 machine each get their own."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-bench", "llama-quantize", "llama-simple", "llama-completion")
DEFAULT_CACHE = Path.home() / ".cache" / "dsmoe" / "llama.cpp"


def cpu_key() -> str:
    """A short name for this CPU's instruction set, so binaries built with -march=native are never run elsewhere."""
    flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = " ".join(sorted(line.split(":", 1)[1].split()))
            break
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def binaries(cache: Path) -> Path:
    return cache / SDIST.replace("==", "-") / cpu_key() / "bin"


def build(cache: Path = DEFAULT_CACHE, jobs: int = 2) -> Path:
    """The folder holding the built TARGETS, building them first if this CPU has none cached."""
    out = binaries(cache)
    if all((out / t).exists() for t in TARGETS):
        return out
    with tempfile.TemporaryDirectory(prefix="llamacpp-build-") as tmp:
        work = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                SDIST,
                "-d",
                str(work),
            ],
            check=True,
        )
        (archive,) = work.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        (source,) = work.glob("llama_cpp_python-*/vendor/llama.cpp")
        build_dir = work / "build"
        subprocess.run(
            [
                "cmake",
                "-S",
                str(source),
                "-B",
                str(build_dir),
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON",
                "-DLLAMA_CURL=OFF",
                "-DBUILD_SHARED_LIBS=OFF",
            ],
            check=True,
        )
        subprocess.run(
            ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TARGETS], check=True
        )
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for target in TARGETS:
            shutil.copy2(build_dir / "bin" / target, staging / target)
        if out.exists():  # an earlier build with fewer targets: replaced whole
            shutil.rmtree(out)
        staging.rename(out)  # whole or absent: a killed build leaves no half-filled cache
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    print(build(args.cache, args.jobs))


if __name__ == "__main__":
    main()
