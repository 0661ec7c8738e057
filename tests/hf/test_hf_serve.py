"""`dsmoe serve` on loopback, through the real `openai` client, on a machine with no Hugging Face cache (HOME and
HF_HOME are empty folders): models.list / models.retrieve, completions streamed or not with the native model's
greedy text, stop sequences, seeded sampling, requests taking turns, and one clear error per bad request."""

import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from dsmoe.inference.generate import generate
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.training.checkpoint import load_pretrained

PROMPT = "The old man crosses the bridge. A dog"


@pytest.fixture(scope="module")
def native_greedy(exported):
    """PROMPT's greedy continuation by the native model under the export's sparse setting: (text, token count)."""
    checkpoint, _ = exported
    native, tokenizer = load_pretrained(checkpoint)
    plan = SparsePlan.build(native.cfg, mlp=SparseSetting("topk", k=3))  # the export's config.json setting
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    eos = tokenizer.token_to_id("<|endoftext|>")
    new = generate(native, ids, 12, eos_token_id=eos, plan=plan)[0, ids.shape[1] :]
    return tokenizer.decode(new.tolist()), len(new)


def test_models_answer_without_a_hugging_face_cache(served):
    client, name, _ = served
    assert [m.id for m in client.models.list()] == [name]
    assert client.models.retrieve(name).id == name
    import openai

    with pytest.raises(openai.NotFoundError, match=f"this server serves '{name}', the exact string given"):
        client.models.retrieve(str(Path(name).resolve()))


def test_completion_streamed_or_not_is_the_native_greedy_text(served, native_greedy):
    client, name, _ = served
    text, n = native_greedy
    answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=12)
    assert answer.choices[0].text == text
    assert answer.usage.completion_tokens == n and answer.choices[0].finish_reason in ("length", "stop")
    chunks = list(
        client.completions.create(
            model=name, prompt=PROMPT, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert len(chunks) > 3  # the text came in pieces
    assert chunks[-2].choices[0].finish_reason == answer.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == n


def test_stop_sequences_and_seeded_sampling(served, native_greedy):
    client, name, _ = served
    text, _ = native_greedy
    stop = re.search(r"[A-Za-z]{2}", text[2:]).group()
    cut = text[: text.index(stop)]
    answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, stop=[stop])
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut
    sample = dict(model=name, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
    first, again = (client.completions.create(**sample).choices[0].text for _ in range(2))
    assert first == again != text


def test_requests_take_turns(served, native_greedy):
    client, name, _ = served
    answers: list[str] = []

    def ask():
        answers.append(client.completions.create(model=name, prompt=PROMPT, max_tokens=12).choices[0].text)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == [native_greedy[0]] * 3


def test_bad_requests_get_one_clear_error(served):
    import openai

    client, name, port = served
    cases = [
        (dict(model="my-model", prompt="x"), openai.NotFoundError, "model 'my-model' is not served here"),
        (dict(model=name, prompt="x", max_tokens=100), openai.BadRequestError, "context is 64 tokens"),
        (dict(model=name, prompt="x", n=2), openai.BadRequestError, "n=2 is not supported"),
        (dict(model=name, prompt=["a", "b"]), openai.BadRequestError, "one prompt per request"),
    ]
    for request, error, message in cases:
        with pytest.raises(error, match=message):
            client.completions.create(**request)
    chat = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(chat, timeout=10)
    assert err.value.code == 404 and b"no /v1/chat/completions" in err.value.read()


def test_serve_names_a_folder_that_is_not_an_export(tmp_path, capsys):
    from dsmoe.cli import main

    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "has no config.json; serve a folder written by `dsmoe export`" in capsys.readouterr().err


@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)  # inductor's own use
def test_compiled_serving_gives_the_eager_completion(exported):
    """`dsmoe serve --compile`: the completer decodes through the compiled step, with the eager completer's text,
    greedy and seeded."""
    from dsmoe.hf.serve import Completer

    _, folder = exported
    texts = {}
    for compile in (False, True):
        completer = Completer(folder, "m", "cpu", compile=compile)
        for body in (
            {"model": "m", "prompt": PROMPT, "max_tokens": 12},
            {"model": "m", "prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "seed": 5},
        ):
            finish: dict = {}
            texts[compile, "temperature" in body] = "".join(completer.pieces(completer.parse(body), finish))
    assert texts[True, False] == texts[False, False] and texts[True, False]
    assert texts[True, True] == texts[False, True]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_int8_serving_decodes_the_native_int8_models_tokens(exported):
    """`dsmoe serve --quantize int8`: the exported model's bundled classes are quantized (int8 storage) and decode
    compiled, giving the greedy text of the native checkpoint quantized the same way."""
    from dsmoe.hf.serve import Completer
    from dsmoe.inference.quantize import quantize

    checkpoint, folder = exported
    completer = Completer(folder, "m", "cpu", quantize="int8")
    assert completer.prepared.compile
    int8 = [t for t in completer.model.state_dict().values() if t.dtype == torch.int8]
    assert len(int8) == 6 * completer.model.config.n_layers + (not completer.model.config.tie_embeddings)
    finish: dict = {}
    text = "".join(
        completer.pieces(completer.parse({"model": "m", "prompt": PROMPT, "max_tokens": 12}), finish)
    )
    model, tokenizer = load_pretrained(checkpoint)
    quantize(model)
    plan = SparsePlan.build(model.cfg, mlp=SparseSetting("topk", k=3))  # the export's setting
    prompt = torch.tensor([tokenizer.encode(PROMPT).ids])
    eos = tokenizer.token_to_id("<|endoftext|>")
    tokens = generate(model, prompt, 12, eos_token_id=eos, plan=plan)[0, prompt.shape[1] :].tolist()
    assert text == tokenizer.decode(tokens) and text
