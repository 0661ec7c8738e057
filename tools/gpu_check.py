"""`make gpu-check`: everything that needs a CUDA GPU, in one run of under 10 minutes on one GPU.

    python3 tools/gpu_check.py [--venv .venv-gpu] [--out benchmarks/gpu] [--no-install | --python PATH]

On a GPU machine it builds a venv from requirements.lock, but with PyPI's CUDA build of torch (the lock pins the CPU
wheel) and the triton that comes with it; or, with --python, uses a Python that already holds CUDA torch, triton,
pytest and transformers (a GPU image's own, on a machine without network) with this checkout's dsmoe on PYTHONPATH.
Then it runs each check in a subprocess with its own time limit and prints one
line per check (PASS / FAIL / SKIP and why):

    gpu-tests       every test marked `gpu` (Triton kernels compiled, TRITON_INTERPRET unset)
    train-tiny      bf16 autocast + torch.compile training steps of tiny-ds-moe (the loop's build_model)
    train-1b-block  one ds-moe-1b-width block (d_model 2048, 16 attention x 2 heads, 32 MLP experts), seq 2048:
                    an eager step's measured peak beside `dsmoe plan`'s trace of it, then compiled bf16 steps
    bench           `dsmoe bench --device cuda --peers --decode both` at a small size (Llama layout), beside
                    transformers' Llama and OLMoE

The summary, the machine and every check's output go to OUT/check.json and OUT/check.log, the benchmark's JSON to
OUT/bench.json. Without a CUDA GPU it says so, runs its CPU self-check (its checks import, the tiny config builds and
trains one CPU step) and exits 0. This file imports only the standard library at the top: it runs before the venv.
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

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # PyPI's Linux wheel of this version is the CUDA build
NOT_FROM_LOCK = ("torch", "triton")  # the lock's CPU torch and its triton; CUDA torch brings its own triton
# seconds per check; together under 10 minutes, one device call
LIMITS = {"gpu-tests": 170, "train-tiny": 80, "train-1b-block": 130, "bench": 160}


# ---- checks: run as `python tools/gpu_check.py --run NAME [--device D]` under the venv's python ----------------


def check_train_tiny(device: str) -> str:
    import torch

    from dsmoe.training.config import TrainConfig
    from dsmoe.training.distributed import DistInfo
    from dsmoe.training.loop import build_model
    from dsmoe.training.optim import build_optimizer

    on_gpu = device == "cuda"
    cfg = TrainConfig(
        model={"preset": "tiny-ds-moe"},
        data="unused",
        seq_len=128,
        micro_batch_size=8,
        compile=on_gpu,
        device=device,
        dtype="bf16" if on_gpu else "fp32",
    )
    model = build_model(cfg, DistInfo(device=torch.device(device)))
    return _train_steps(model, build_optimizer(model, cfg), cfg, device, steps=4 if on_gpu else 1)


def _train_steps(model, optimizer, cfg, device: str, steps: int) -> str:
    import contextlib

    import torch

    vocab = model.cfg.vocab_size
    x = torch.randint(0, vocab, (cfg.micro_batch_size, cfg.seq_len), device=device)
    bf16 = cfg.dtype == "bf16"
    losses = []
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = model(x, x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    if not all(torch.isfinite(torch.tensor(losses))):
        raise RuntimeError(f"non-finite loss: {losses}")
    if steps > 1 and not losses[-1] < losses[0]:
        raise RuntimeError(f"the loss did not fall over {steps} steps on one batch: {losses}")
    return f"{steps} step(s), loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def check_train_1b_block(device: str) -> str:
    import torch

    from dsmoe.training.config import TrainConfig
    from dsmoe.training.distributed import DistInfo
    from dsmoe.training.loop import build_model
    from dsmoe.training.optim import build_optimizer
    from dsmoe.training.plan import trace_step

    on_gpu = device == "cuda"
    seq = 2048 if on_gpu else 64
    values = dict(
        model={"preset": "ds-moe-1b", "n_layers": 1}, data="unused", seq_len=seq, micro_batch_size=2
    )
    values.update(global_batch_tokens=2 * seq, device=device, dtype="bf16" if on_gpu else "fp32")
    eager = TrainConfig(**values)
    traced = trace_step(eager, 1, 2, checkpointing=False, bf16=on_gpu, foreach=on_gpu)
    if not on_gpu:  # the self-check: the trace and the pieces below run
        return f"traced peak {traced.peak / 1e9:.2f} GB at seq {seq} (CPU self-check, no steps)"
    model = build_model(eager, DistInfo(device=torch.device(device)))
    optimizer = build_optimizer(model, eager)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _train_steps(model, optimizer, eager, device, steps=2)
    measured = torch.cuda.max_memory_allocated()
    del model, optimizer
    torch.cuda.empty_cache()
    compiled = TrainConfig(**{**values, "compile": True})
    model = build_model(compiled, DistInfo(device=torch.device(device)))
    steps = _train_steps(model, build_optimizer(model, compiled), compiled, device, steps=3)
    ratio = traced.peak / measured
    return (
        f"eager peak {measured / 1e9:.2f} GB (model {base / 1e9:.2f} GB before the steps), `dsmoe plan` trace "
        f"{traced.peak / 1e9:.2f} GB ({ratio:.2f}x); compiled bf16: {steps}"
    )


CHECKS = {"train-tiny": check_train_tiny, "train-1b-block": check_train_1b_block}


def run_check(name: str, device: str) -> int:
    print(CHECKS[name](device))
    return 0


# ---- the driver: system python, standard library only ------------------------------------------------------


def gpu_test_files() -> list[str]:
    """The test files that hold gpu-marked tests: collecting only these, a GPU image without the data and eval
    extras (datasets, lm-eval) still runs them."""
    files = sorted(p for p in (ROOT / "tests").rglob("test_*.py") if "pytest.mark.gpu" in p.read_text())
    return [str(p.relative_to(ROOT)) for p in files]


def gpu_present() -> str | None:
    """The GPU's name from nvidia-smi, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    proc = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None


def build_venv(venv: Path, log) -> Path:
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    kept = [line for line in lines if line.split("==")[0].strip().lower() not in NOT_FROM_LOCK]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as lock:
        lock.write("\n".join(kept) + "\n")
    steps = [
        [sys.executable, "-m", "venv", str(venv)] if not python.exists() else None,
        [*pip, "-c", lock.name, "--upgrade", "pip", "setuptools"],
        [*pip, TORCH],  # the CUDA build and its triton
        [*pip, "-c", lock.name, "-e", f"{ROOT}[all]"],
    ]
    for cmd in filter(None, steps):
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return python


def run_step(name: str, cmd: list[str], log, env: dict[str, str]) -> tuple[str, str]:
    """Run one check; (status, the last line of its output or why it failed)."""
    log.write(f"\n==== {name}: {' '.join(cmd)}\n")
    log.flush()
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=LIMITS[name], cwd=ROOT, env=env, check=False
        )
    except subprocess.TimeoutExpired as err:
        log.write(str(err.stdout or "") + str(err.stderr or ""))
        return "FAIL", f"over its {LIMITS[name]} s limit"
    log.write(proc.stdout + proc.stderr + f"\n(exit {proc.returncode}, {time.monotonic() - start:.0f} s)\n")
    lines = [line for line in (proc.stdout.strip() or proc.stderr.strip()).splitlines() if line.strip()]
    if proc.returncode != 0 and proc.stderr.strip():
        lines = proc.stderr.strip().splitlines()  # the error's last line
    last = lines[-1].strip() if lines else "(no output)"
    if name == "gpu-tests" and proc.returncode == 5:
        return "FAIL", "no gpu-marked test was collected"
    if proc.returncode == 0 and name == "gpu-tests" and " skipped" in last:
        return "FAIL", f"gpu tests were skipped on a GPU machine: {last}"
    return ("PASS" if proc.returncode == 0 else "FAIL"), last


def self_check(python: str) -> int:
    """No GPU: the checks' own code runs on the CPU (at CPU sizes), with the project's venv if it has one."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # this checkout's dsmoe
    env.setdefault("OMP_NUM_THREADS", "1")
    failed = 0
    for name in CHECKS:
        proc = subprocess.run(
            [python, __file__, "--run", name, "--device", "cpu"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        ok = proc.returncode == 0
        failed += not ok
        tail = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
        print(f"{'PASS' if ok else 'FAIL'} self-check {name}: {tail[-1] if tail else '(no output)'}")
    for name in ("gpu-tests", *CHECKS, "bench"):
        print(f"SKIP {name}: no CUDA GPU (nvidia-smi finds none)")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--venv", type=Path, default=ROOT / ".venv-gpu", help="the CUDA venv (made if missing)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu", help="where results go")
    parser.add_argument("--no-install", action="store_true", help="use --venv as it is")
    parser.add_argument(
        "--python",
        help="use this Python as it is (one holding CUDA torch, triton, pytest, transformers); installs nothing",
    )
    parser.add_argument(
        "--checks", default=",".join(LIMITS), help=f"comma-separated, of {', '.join(LIMITS)} (default: all)"
    )
    parser.add_argument("--run", choices=sorted(CHECKS), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        return run_check(args.run, args.device)
    gpu = gpu_present()
    if gpu is None:
        local = ROOT / ".venv" / "bin" / "python"
        print("gpu-check: no CUDA GPU on this machine; running the CPU self-check only")
        failed = self_check(str(local) if local.exists() else sys.executable)
        print(f"gpu-check: self-check {'failed' if failed else 'passed'}; nothing measured (no GPU)")
        return 0 if not failed else 1
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, str]] = {}
    with open(args.out / "check.log", "w") as log:
        started = time.monotonic()
        try:
            if args.python:
                python = Path(shutil.which(args.python) or args.python)
            else:
                python = args.venv / "bin" / "python" if args.no_install else build_venv(args.venv, log)
        except subprocess.CalledProcessError as err:
            print(f"FAIL install: {' '.join(err.cmd)} exited {err.returncode} (see {args.out / 'check.log'})")
            return 1
        env = {
            k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"
        }  # kernels compiled, not interpreted
        env.update(
            HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT)
        )
        bench_json = args.out / "bench.json"
        commands = {
            "gpu-tests": [
                str(python),
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-m",
                "gpu",
                *gpu_test_files(),
            ],
            "train-tiny": [str(python), __file__, "--run", "train-tiny"],
            "train-1b-block": [str(python), __file__, "--run", "train-1b-block"],
            "bench": [str(python), "-m", "dsmoe", "bench", "--device", "cuda", "--dtype", "bf16"]
            + ["--d-model", "1024", "--n-layers", "4", "--max-input-batch", "64", "--memory-gb", "16"]
            + ["--decode-tokens", "128", "--shape", "llama", "--peers", "--decode", "both"]
            + ["--out", str(bench_json)],
        }
        probe = subprocess.run(
            [
                str(python),
                "-c",
                "import platform, torch, triton, transformers; print(platform.python_version(), torch.__version__, "
                "torch.version.cuda, triton.__version__, transformers.__version__)",
            ],
            capture_output=True,
            text=True,
        )
        summary = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "gpu": gpu,
            "host": platform.node(),
            "python_torch_cuda_triton_transformers": probe.stdout.strip() or probe.stderr.strip()[-300:],
            "checks": results,
        }
        chosen = args.checks.split(",")
        if unknown := set(chosen) - set(commands):
            parser.error(f"--checks: unknown {', '.join(sorted(unknown))}; choose from {', '.join(commands)}")
        for name, cmd in ((n, commands[n]) for n in chosen):
            status, why = run_step(name, cmd, log, env)
            results[name] = {"status": status, "detail": why}
            print(f"{status} {name}: {why}", flush=True)
            summary["seconds"] = round(time.monotonic() - started)  # written after every check: a cut-off run
            (args.out / "check.json").write_text(json.dumps(summary, indent=2) + "\n")  # keeps what ran
    failed = [name for name, r in results.items() if r["status"] == "FAIL"]
    print(
        f"gpu-check: {len(results) - len(failed)} of {len(results)} passed in {summary['seconds']} s; {args.out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
