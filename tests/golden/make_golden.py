"""Regenerate tests/golden/loss_curves.json, the golden loss curves of tests/test_golden_curves.py.

    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 python tests/golden/make_golden.py

When regenerating is legitimate: only when a change alters the training math on purpose (a new loss term, a fixed
bug in the MI or switch loss, another initialisation, optimizer or schedule, a new preset shape, a changed synthetic
corpus), and the commit that carries the new file says so and why. Never to make a refactor's failing test pass:
a refactor that is meant to change nothing must reproduce the old curves. A torch upgrade that moves the curves
beyond the tolerance is a change of the math too: regenerate in the commit that upgrades, and say so.

It trains each preset twice and refuses to write unless both runs are bit-identical, so that the file only ever
holds a reproducible curve.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: helpers and the test module

import torch  # noqa: E402
from helpers import prepared_data  # noqa: E402
from test_golden_curves import (  # noqa: E402
    CORPUS,
    GOLDEN_FILE,
    PRESETS,
    SETTINGS,
    STEPS,
    corpus_sha256,
    run_curve,
)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepared_data(Path(tmp) / "corpus", **CORPUS)
        curves = {}
        for preset in PRESETS:
            first = run_curve(preset, data_dir, Path(tmp) / f"{preset}-1")
            second = run_curve(preset, data_dir, Path(tmp) / f"{preset}-2")
            if first != second:
                raise SystemExit(f"{preset}: two runs gave different curves; not writing {GOLDEN_FILE}")
            curves[preset] = first
            print(f"{preset}: loss {first['loss'][0]:.4f} -> {first['loss'][-1]:.4f}", file=sys.stderr)
        golden = {
            "about": "First optimizer steps of the tiny presets on helpers.prepared_data(); checked by "
            "tests/test_golden_curves.py, written by tests/golden/make_golden.py (read its docstring before "
            "regenerating).",
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the ATen kernels it ran on
            "steps": STEPS,
            "settings": SETTINGS,
            "corpus": {"prepared_data": CORPUS, "sha256": corpus_sha256(data_dir)},
            "curves": curves,
        }
    GOLDEN_FILE.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN_FILE}", file=sys.stderr)


if __name__ == "__main__":
    main()
