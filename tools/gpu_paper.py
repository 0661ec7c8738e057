"""The paper's GPU tables (issue #32) in one command, under 8 minutes on one H100:

    python3 tools/gpu_paper.py --python python3 [--out benchmarks/gpu/paper] [--parts infer-3b,infer-6b,train-1b]
    python3 tools/gpu_paper.py --dry-run [--out DIR]       # tiny shapes on the CPU, the same code end to end

Each part runs in a subprocess with its own time limit (PARTS), and writes its JSON after every measurement, so a
part cut off keeps what it measured and cannot starve the parts after it:

    infer-3b   Dense-3B against DS-MoE-3B (top-6 of 32 MLP experts), 28 layers   } bf16, random weights, Llama layout
    infer-6b   Dense-6B against DS-MoE-6B (top-4), 36 layers                     } (SwiGLU, RMSNorm), transformers'
                                                                                 } LlamaForCausalLM at the Dense shape
               in the same rounds. Input tokens/s (sequences of 256, the batch as large as memory allows, at most
               256); Table 5's latency (64 prompts of 2,000 tokens + 20 new, eager; fewer prompts where memory says
               so, and the JSON says how many ran and why); decode tokens/s at batch 1, 16 and 64 (64 tokens after a
               64-token prompt), ours through the compiled decode step under CUDA graphs, the peer eager.
    train-1b   dense-1b, then ds-moe-1b (24 layers, the paper's GELU layout): bf16 autocast, every block compiled,
               AdamW, sequences of 2,048, the largest micro-batch that `dsmoe plan`'s trace fits in 75 GiB; two
               warm-up steps and three timed ones each; tokens/s and model FLOP utilisation (all experts counted,
               as dense training computes them) against the GPU's bf16 peak.

Results: OUT/infer-3b.json, OUT/infer-6b.json, OUT/train-1b.json, OUT/summary.json (the GPU, the versions, each
part's status, written after every part) and OUT/paper.log (every part's output). ``--python`` is the GPU image's own
Python (torch, triton, transformers; no network), with this checkout put on PYTHONPATH. Without a GPU (or with
--dry-run) every part runs at tiny shapes on the CPU, in fp32, its training steps eager: what tests/test_gpu_paper.py
runs. This file imports only the standard library at the top, as tools/gpu_check.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_check import gpu_present  # this folder, on the path when run as a script

ROOT = Path(__file__).resolve().parents[1]
# seconds per part on the GPU; together 470 s, under the 8 minutes of the issue. The inference parts' budget goes
# mostly to compiling the decode step (one graph per model and batch size) at full depth.
PARTS = {"infer-3b": 150, "infer-6b": 190, "train-1b": 130}
DRY_RUN_LIMIT = 240  # seconds per part on a CPU (a loaded CI machine)
DEFAULT_OUT = ROOT / "benchmarks" / "gpu" / "paper"


# ---- a part: `python tools/gpu_paper.py --run PART --json FILE [--dry-run]` -----------------------------------


def write_json(path: Path, result: dict) -> None:
    """Replace ``path`` whole (a part killed mid-write leaves the previous version)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def run_part(name: str, out_json: Path, dry_run: bool) -> int:
    from dsmoe.bench import paper

    device = "cpu" if dry_run else "cuda"

    def report(result: dict) -> None:
        write_json(out_json, {"part": name, "dry_run": dry_run, "complete": False, **result})

    if name.startswith("infer-"):
        result = paper.inference(
            paper.inference_settings(name[len("infer-") :], dry_run=dry_run, device=device), report
        )
        summary = ", ".join(
            f"{metric} {ratio:.2f}x" for metric, ratio in result["ratios_to_dense"]["ds-moe"].items()
        )
        line = f"ds-moe / dense: {summary}; latency batch {result['latency_batch']['ran']}"
    else:
        result = paper.training(paper.train_spec(dry_run=dry_run, device=device), report)
        line = "; ".join(
            f"{n} {r['tokens_per_s']:.0f} tokens/s"
            + (f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else "")
            + f" (micro-batch {r['plan']['micro_batch']})"
            for n, r in result["models"].items()
        )
    write_json(out_json, {"part": name, "dry_run": dry_run, "complete": True, **result})
    print(line)
    return 0


# ---- the driver: standard library only ------------------------------------------------------------------------


def versions(python: str, env: dict[str, str]) -> str:
    probe = subprocess.run(
        [python, "-c", "import platform, torch, transformers; print(platform.python_version(), torch.__version__, "
         "torch.version.cuda, transformers.__version__)"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    return probe.stdout.strip() or probe.stderr.strip()[-300:]


def run_one(name: str, python: str, out: Path, dry_run: bool, limit: int, log, env) -> dict:
    """One part in its own process under its time limit: its status, the last line it printed, seconds."""
    out_json = out / f"{name}.json"
    cmd = [python, str(Path(__file__).resolve()), "--run", name, "--json", str(out_json)]
    cmd += ["--dry-run"] if dry_run else []
    log.write(f"\n==== {name}: {' '.join(cmd)}\n")
    log.flush()
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as err:
        log.write(str(err.stdout or "") + str(err.stderr or ""))
        kept = "what it measured is kept" if out_json.exists() else "nothing was measured"
        return {"status": "TIMEOUT", "detail": f"over its {limit} s limit; {kept}", "seconds": limit}
    seconds = round(time.monotonic() - start)
    log.write(proc.stdout + proc.stderr + f"\n(exit {proc.returncode}, {seconds} s)\n")
    text = proc.stdout if proc.returncode == 0 else proc.stderr or proc.stdout
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    status = "PASS" if proc.returncode == 0 else "FAIL"
    return {"status": status, "detail": lines[-1] if lines else "(no output)", "seconds": seconds}


def part_names(text: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        parser.error(
            f"--parts: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--python", help="the Python that runs the parts (default: this checkout's .venv, or this one)"
    )
    parser.add_argument("--out", type=Path, help=f"where the JSON goes (default {DEFAULT_OUT.relative_to(ROOT)}; "
                        "a dry run: a new temporary folder)")  # fmt: skip
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU (the default without a GPU)"
    )
    parser.add_argument("--run", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        if args.json is None:
            parser.error("--run needs --json")
        return run_part(args.run, args.json, args.dry_run)
    names = part_names(args.parts, parser)
    gpu = gpu_present()
    dry_run = args.dry_run or gpu is None
    if dry_run and not args.dry_run:
        print(
            "gpu-paper: no CUDA GPU on this machine (nvidia-smi finds none): a dry run at tiny shapes on the CPU"
        )
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-paper-")) if dry_run else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    local = ROOT / ".venv" / "bin" / "python"
    python = args.python or (str(local) if local.exists() else sys.executable)
    python = shutil.which(python) or python
    env = {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"
    }  # kernels compiled, not interpreted
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    summary: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "gpu": gpu,
        "host": platform.node(),
        "python_torch_cuda_transformers": versions(python, env),
        "limits_s": {n: DRY_RUN_LIMIT if dry_run else PARTS[n] for n in names},
        "parts": {},
    }
    started = time.monotonic()
    with open(out / "paper.log", "w") as log:
        for name in names:
            outcome = run_one(name, python, out, dry_run, summary["limits_s"][name], log, env)
            summary["parts"][name] = outcome
            summary["seconds"] = round(time.monotonic() - started)
            write_json(out / "summary.json", summary)  # after every part: a run cut off keeps what ran
            print(f"{outcome['status']} {name} ({outcome['seconds']} s): {outcome['detail']}", flush=True)
    passed = sum(p["status"] == "PASS" for p in summary["parts"].values())
    print(f"gpu-paper: {passed} of {len(names)} parts passed in {summary['seconds']} s; results in {out}")
    return 0 if passed == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
