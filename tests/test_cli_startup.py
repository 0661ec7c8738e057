"""The command line starts without importing torch (lazy imports), and says its version."""

import subprocess
import sys

import dsmoe


def test_help_and_parsing_import_no_heavy_library():
    code = (
        "import sys; from dsmoe.cli import build_parser; build_parser().format_help(); "
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'numpy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_version():
    proc = subprocess.run(
        [sys.executable, "-m", "dsmoe", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"dsmoe {dsmoe.__version__}"
    assert dsmoe.__version__ != "0+unknown"


def test_public_names_load_on_first_use():
    assert dsmoe.Transformer.__name__ == "Transformer" and "SparsePlan" in dir(dsmoe)
