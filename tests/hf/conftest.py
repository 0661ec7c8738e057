import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_fixtures import make_checkpoint
from servers import free_port, wait_until_healthy

from dsmoe.cli import main

REPO = Path(__file__).resolve().parents[2]
EXPORT_SPARSE = ["--strategy", "topk", "--k", "3"]  # stored in config.json; native comparisons use the same


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(checkpoint folder, exported Hugging Face folder) of one tiny random DS-MoE model with a real tokenizer."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(root)
    out = root / "hf-model"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *EXPORT_SPARSE]) == 0
    return checkpoint, out


@pytest.fixture(scope="session")
def server_log(tmp_path_factory):
    """The file that the `served` server's output (stdout and stderr) goes to."""
    return tmp_path_factory.mktemp("serve-log") / "server.log"


@pytest.fixture(scope="session")
def served(exported, tmp_path_factory, server_log):
    """(openai client, the --model string, port) of `dsmoe serve` on the export, started from the export's parent
    folder with a relative --model and an empty HOME; its output goes to ``server_log``."""
    openai = pytest.importorskip("openai", reason="the OpenAI client is in the 'hf' extra")
    _, folder = exported
    home = tmp_path_factory.mktemp("empty-home")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    log = open(server_log, "w")  # noqa: SIM115 (closed when the server stops)
    server = subprocess.Popen(
        [sys.executable, "-m", "dsmoe", "serve", "--model", folder.name, "--port", str(port)],
        cwd=folder.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", server, timeout=120)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0
        )
        yield client, folder.name, port
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
