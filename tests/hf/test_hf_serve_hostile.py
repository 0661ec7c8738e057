"""`dsmoe serve` against bad and hostile clients on loopback, over raw HTTP: every request gets an answer (400, 404,
411, 413), never a dropped connection or a 500; no request can hold the model for long; a body the server did not
read never becomes the next request; a client that hangs up is one line in the log."""

import http.client
import json
import random
import socket
import time

import pytest

from dsmoe.hf.serve import MAX_STOP_CHARS, _held_back


def post(port: int, body: bytes, path: str = "/v1/completions", headers: dict | None = None):
    """(status, parsed JSON answer or the raw text of a stream) of one POST on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        answer = conn.getresponse()
        data = answer.read().decode()
        kind = answer.getheader("Content-Type", "")
        return answer.status, json.loads(data) if kind == "application/json" else data
    finally:
        conn.close()


def raw_exchange(port: int, request: bytes) -> bytes:
    """Everything the server sends back on one connection until it closes it (or 10 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            chunks.append(b"<still open after 10 s>")
        return b"".join(chunks)


def completion(name: str, **fields) -> bytes:
    return json.dumps({"model": name, "prompt": "The old man", "max_tokens": 3, **fields}).encode()


def test_held_back_is_the_plain_definition():
    """The ending of the text kept back as a possible start of a stop sequence, against its plain definition."""

    def reference(text, stops):
        return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 14)))
        stops = [
            "".join(rng.choice("ab\n") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))
        ]
        assert _held_back(text, stops) == reference(text, stops), (text, stops)


def test_stop_sequences_are_bounded(served):
    _, name, port = served
    status, answer = post(port, completion(name, stop=["x" * 240_000] * 4))
    assert status == 400 and f"at most {MAX_STOP_CHARS}" in answer["error"]["message"]
    assert answer["error"]["param"] == "stop"
    status, answer = post(port, completion(name, stop=["z" * (MAX_STOP_CHARS // 4)] * 4))  # at the limit
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": float("nan")}, None),  # json.dumps writes NaN, which is not JSON
        ({"top_p": float("nan")}, None),
        ({"temperature": float("inf")}, None),
        ({"max_tokens": float("-inf")}, None),
        (
            {"temperature": "1e999"},
            "temperature",
        ),  # a JSON number beyond float, which Python reads as infinity
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"max_tokens": 10**400}, "max_tokens"),
        ({"temperature": 10**400}, "temperature"),
        ({"prompt": "\ud800"}, "prompt"),  # a lone surrogate: JSON's escapes allow it, UTF-8 does not
        ({"stop": "\udfff"}, "stop"),
    ],
)
def test_numbers_and_text_beyond_range_are_400(served, fields, param, stream):
    _, name, port = served
    body = json.dumps({"model": name, "prompt": "The old man", "max_tokens": 3, "stream": stream, **fields})
    status, answer = post(port, body.replace('"1e999"', "1e999").encode())
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param


@pytest.mark.parametrize(
    "body, message",
    [
        (b"[" * 100_000, "nests arrays or objects too deeply"),
        (b'{"model": 1' + b"1" * 5000 + b"}", "not JSON"),  # an integer too long to convert
        (b"\xff\xfe{}", "not JSON"),
    ],
)
def test_malformed_bodies_are_400(served, body, message):
    _, _, port = served
    status, answer = post(port, body)
    assert status == 400 and message in answer["error"]["message"]


def test_bad_headers_are_answered_and_the_connection_ends(served):
    _, _, port = served
    answer = raw_exchange(
        port,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n{}",  # a superscript 2
    )
    assert answer.startswith(b"HTTP/1.1 400") and b"Content-Length header" in answer
    answer = raw_exchange(
        port,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 411") and answer.count(b"HTTP/1.1") == 1


@pytest.mark.parametrize(
    "head, status",
    [
        (b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n", b"404"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", b"413"),
    ],
)
def test_an_unread_body_never_becomes_the_next_request(served, head, status):
    """Keep-alive: a body the server answers without reading (here a whole second request) must not be parsed as
    the connection's next request; the server closes the connection after its answer instead."""
    _, _, port = served
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw_exchange(port, head.replace(b"{n}", str(len(smuggled)).encode()) + smuggled)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert answer.count(b"HTTP/1.1") == 1 and b'"status": "ok"' not in answer
    assert b"<still open" not in answer and b"Connection: close" in answer


def test_a_read_body_keeps_the_connection(served):
    """The other side of the rule above: after an answered request whose body was read, the connection stays
    usable for the next request."""
    _, name, port = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for body in (b"{bad json", completion(name, max_tokens=1)):
            conn.request("POST", "/v1/completions", body=body)
            answer = conn.getresponse()
            answer.read()
        assert answer.status == 200
    finally:
        conn.close()


def test_clients_that_hang_up_are_one_line_each(served, server_log):
    _, name, port = served
    before = server_log.read_text()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + b"{" * 10)
    status, _ = post(port, completion(name, max_tokens=1))  # the server is still there
    assert status == 200
    deadline = time.monotonic() + 20
    while (new := server_log.read_text()[len(before) :]).count(
        "went away"
    ) < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Traceback" not in new
    assert new.count("the client went away") == 20, new[-2000:]


def test_a_failure_mid_stream_is_an_error_event(exported, monkeypatch):
    """Once a stream's 200 is sent, a generation failure arrives as an OpenAI error event, then [DONE]."""
    import threading
    from http.server import ThreadingHTTPServer

    from dsmoe.hf.serve import Completer, make_handler

    completer = Completer(exported[1], "m", "cpu")

    def failing(req, finish):
        yield "The"
        raise RuntimeError("out of memory")

    monkeypatch.setattr(completer, "pieces", failing)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(completer, log_requests=False))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, text = post(
            server.server_address[1], json.dumps({"model": "m", "prompt": "a", "stream": True}).encode()
        )
    finally:
        server.shutdown()
        server.server_close()
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert status == 200 and json.loads(events[0])["choices"][0]["text"] == "The"
    assert json.loads(events[1])["error"] == {
        "message": "generation failed: RuntimeError: out of memory",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert events[2:] == ["[DONE]"]
