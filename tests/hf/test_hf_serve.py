"""`dsmoe serve` answers one OpenAI-style completion on loopback with the same greedy text as the native model."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from dsmoe.inference.generate import generate
from dsmoe.inference.sparsify import sparsify
from dsmoe.model.routing import SparseSetting
from dsmoe.training.checkpoint import load_pretrained

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"server exited with {server.returncode}: {server.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"server not healthy after {timeout} s")


@pytest.mark.slow  # ~25 s on 2 cores: server start-up dominates
def test_openai_completion_on_loopback(exported, tmp_path):
    openai = pytest.importorskip("openai", reason="the OpenAI client is in the 'hf' extra")
    checkpoint, folder = exported
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path)}
    server = subprocess.Popen(
        [sys.executable, "-m", "dsmoe", "serve", "--model", str(folder), "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", server, timeout=120)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0
        )
        prompt = "The old man crosses the bridge. A dog"
        answer = client.completions.create(model=str(folder.resolve()), prompt=prompt, max_tokens=8)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    native, tokenizer = load_pretrained(checkpoint)
    sparsify(native, mlp=SparseSetting("topk", k=3))  # the setting the export stored in config.json
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    expected = generate(native, ids, 8, eos_token_id=tokenizer.token_to_id("<|endoftext|>"))[
        0, ids.shape[1] :
    ]
    assert answer.choices[0].text == tokenizer.decode(expected.tolist())
    assert answer.usage.completion_tokens == len(expected)


def test_serve_names_a_folder_that_is_not_an_export(tmp_path, capsys):
    from dsmoe.cli import main

    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "has no config.json; serve a folder written by `dsmoe export`" in capsys.readouterr().err
