"""``dsmoe serve``: an OpenAI-compatible HTTP server for a folder written by ``dsmoe export``, on the CPU or a GPU:
``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/completions`` (streamed or not) and ``GET /health``.

It runs one completion at a time: requests wait their turn, while ``/health`` and ``/v1/models`` answer at once. That
is enough to try a model with the ``openai`` client; to serve many users, use vLLM (``vllm serve FOLDER
--trust-remote-code``). The model is the one string given to ``--model``: a request's ``model`` must be exactly it.
The folder is loaded with the installed dsmoe's own classes, so no Hugging Face cache and no remote code are needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from dsmoe.config import ConfigError
from dsmoe.inference.arguments import COMPILE_HELP, COMPILING, add_kernels_arg, add_quantize_arg

MAX_BODY = 1 << 20  # bytes of a request body
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_STOP_CHARS = 1024  # characters of all stop sequences together: stops are short, never documents
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
# Fields of /v1/completions this server does not implement: accepted only at their neutral value.
NEUTRAL: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "suffix": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
}
FIELDS = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
}


class RequestError(Exception):
    """A request the server cannot answer: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


class Completer:
    """The model, its tokenizer, and the lock that makes completions take turns."""

    def __init__(
        self,
        folder: Path,
        name: str,
        device: str,
        settings: str | Path | None = None,
        compile: bool = False,
        quantize: str = "none",
        kernels: str = "auto",
    ):
        import torch
        from tokenizers import Tokenizer

        from dsmoe.hf import DSMoEForCausalLM
        from dsmoe.inference.prepare import prepare

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = DSMoEForCausalLM.from_pretrained(folder).eval()
        if settings is not None:  # per-layer sparse settings (dsmoe tune) instead of config.json's
            self.model.load_sparse_settings(settings)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.prepared = prepare(
            self.model.model,
            self.model.sparse_plan,
            quantize=quantize,
            device=self.device,
            kernels=kernels,
            compile=compile,
            tokenizer=self.tokenizer,
        )
        self.eos = self.model.config.eos_token_id
        self.name = name
        self.created = int((folder / "config.json").stat().st_mtime)
        self.lock = threading.Lock()
        self.compiled_lengths: set[int] = set()  # cache lengths whose decode step has compiled

    def model_card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "dsmoe"}

    def check_model(self, model: Any) -> None:
        if model != self.name:
            raise RequestError(
                404,
                f"model {model!r} is not served here: this server serves {self.name!r}, the exact string given "
                "to `dsmoe serve --model`",
                "model",
                "model_not_found",
            )

    def parse(self, body: Any) -> dict[str, Any]:
        """The request's settings, checked; RequestError names the first field that is wrong."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        for key, value in body.items():
            if key in NEUTRAL:
                if value is not None and value != NEUTRAL[key]:
                    raise RequestError(400, f"{key}={value!r} is not supported by dsmoe serve", key)
            elif key not in FIELDS:
                raise RequestError(400, f"unknown field {key!r} for /v1/completions", key)
        if "model" not in body:
            raise RequestError(400, "the request needs 'model'", "model")
        self.check_model(body["model"])
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "prompt must be one string (send one prompt per request)", "prompt")
        max_tokens = _number(body, "max_tokens", 16, int, low=1)
        temperature = _number(body, "temperature", 0.0, float, low=0, high=2)
        top_p = _number(body, "top_p", 1.0, float, low=0, high=1)
        if top_p == 0:
            raise RequestError(400, "top_p must be > 0", "top_p")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not (
            isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop)
        ):
            raise RequestError(
                400, f"stop must be a string or a list of at most {MAX_STOP} non-empty strings", "stop"
            )
        if sum(map(len, stop)) > MAX_STOP_CHARS:
            raise RequestError(
                400,
                f"the stop sequences have {sum(map(len, stop))} characters together; at most {MAX_STOP_CHARS}",
                "stop",
            )
        for name, text in [("prompt", prompt)] + [("stop", s) for s in stop]:
            _check_text(text, name)
        seed = body.get("seed")
        if seed is not None and (
            not isinstance(seed, int) or isinstance(seed, bool) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]
        ):
            raise RequestError(400, "seed must be an integer between -2**63 and 2**64 - 1", "seed")
        ids = self.tokenizer.encode(prompt).ids or [self.eos]  # an empty prompt starts a new document
        context = self.model.config.max_seq_len
        if len(ids) + max_tokens > context:
            raise RequestError(
                400,
                f"this model's context is {context} tokens, but the prompt has {len(ids)} and max_tokens asks for "
                f"{max_tokens} more: shorten the prompt or lower max_tokens",
                "max_tokens",
            )
        if body.get("stream") not in (None, True, False):
            raise RequestError(400, "stream must be true or false", "stream")
        options = body.get("stream_options") or {}
        return {
            "ids": ids,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": stop,
            "seed": seed,
            "stream": body.get("stream") is True,
            "usage_chunk": bool(isinstance(options, dict) and options.get("include_usage")),
        }

    def pieces(self, req: dict[str, Any], finish: dict[str, Any]) -> Iterator[str]:
        """The completion's text, piece by piece as it is generated; at the end ``finish`` holds its
        ``finish_reason`` and ``tokens``. Call it holding ``self.lock``."""
        import torch

        from dsmoe.inference.generate import cache_length, stream

        if self.prepared.compile:
            length = cache_length(len(req["ids"]) + req["max_tokens"], self.model.config.max_seq_len)
            if length not in self.compiled_lengths:
                self.compiled_lengths.add(length)
                print(f"{COMPILING} (cache length {length})", file=sys.stderr, flush=True)
        generator = None
        if req["seed"] is not None:
            generator = torch.Generator(self.device).manual_seed(req["seed"])
        tokens = stream(
            self.prepared.model,
            torch.tensor(req["ids"], device=self.device),
            req["max_tokens"],
            temperature=req["temperature"],
            top_p=req["top_p"],
            eos_token_id=self.eos,
            generator=generator,
            plan=self.prepared.plan,
            compile=self.prepared.compile,
        )
        ids: list[int] = []
        sent, reason = "", "length"
        longest = max(map(len, req["stop"]), default=0)
        for token in tokens:
            ids.append(token)
            text = self.tokenizer.decode(ids)
            # A stop not found before was not wholly inside ``sent``: look only where one could end in new text.
            cut = _first_stop(text, req["stop"], max(0, len(sent) - longest + 1))
            if cut >= 0:
                text, reason = text[:cut], "stop"
            elif token == self.eos:
                reason = "stop"
            elif text.endswith("\ufffd"):  # part of a character: wait for the rest of its bytes
                continue
            else:  # keep back an ending that may be the start of a stop sequence
                text = text[: len(text) - _held_back(text, req["stop"])]
            if len(text) > len(sent):
                yield text[len(sent) :]
                sent = text
            if reason == "stop":
                break
        if reason == "length" and len(rest := self.tokenizer.decode(ids)) > len(sent):
            yield rest[len(sent) :]
        finish.update(finish_reason=reason, tokens=len(ids))


def _json_body(data: bytes) -> Any:
    """The request body as JSON, strictly: UTF-8, no NaN or Infinity (Python writes them, JSON has none), nesting
    within Python's recursion limit, integers of at most 4,300 digits."""

    def refuse_constant(name: str) -> Any:
        raise RequestError(400, f"the request body is not JSON: {name} is not a JSON number")

    try:
        return json.loads(data.decode("utf-8") or "null", parse_constant=refuse_constant)
    except RecursionError:
        raise RequestError(400, "the request body nests arrays or objects too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise RequestError(400, f"the request body is not JSON: {err}") from None


def _number(body: dict[str, Any], key: str, default: Any, kind: type, low: float, high: float | None = None):
    value = body.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        raise RequestError(
            400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}", key
        )
    if (
        (isinstance(value, float) and not math.isfinite(value))
        or value < low
        or (high is not None and value > high)
    ):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise RequestError(400, f"{key} must be {bounds}, got {value!r}", key)
    return kind(value)


def _first_stop(text: str, stops: list[str], start: int) -> int:
    """Where the first stop sequence in ``text[start:]`` begins; -1 if none does."""
    return min((i for s in stops if (i := text.find(s, start)) >= 0), default=-1)


def _held_back(text: str, stops: list[str]) -> int:
    """The length of the longest ending of ``text`` that a stop sequence starts with (a proper part of it). Only
    endings that begin with the stop's first character are compared, each at most ``len(stop) - 1`` characters."""
    best = 0
    for s in stops:
        i = max(0, len(text) - len(s) + 1)
        while (i := text.find(s[0], i)) >= 0:
            if s.startswith(text[i:]):
                best = max(best, len(text) - i)
                break
            i += 1
    return best


def _check_text(text: str, name: str) -> None:
    """Text that UTF-8 cannot encode (a lone surrogate such as "\\ud800", which JSON escapes allow) is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(
            400, f"{name} holds a character that is not valid Unicode text at position {err.start}", name
        ) from None


def make_handler(completer: Completer, log_requests: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 120  # seconds a connection may sit idle

        def log_message(self, format: str, *args: Any) -> None:
            if log_requests:
                super().log_message(format, *args)

        body_read = False  # whether this request's body has been read off the connection

        def handle(self) -> None:
            """One connection; a client that hangs up is one line in the log, not a traceback."""
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as err:
                print(f"{self.address_string()}: the client went away ({err})", file=sys.stderr, flush=True)

        def send_json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            if not self.body_read and (
                self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
            ):
                # a body left unread would be taken for the next request on this connection: end the connection
                self.send_header("Connection", "close")
                self.close_connection = True
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.body_read = False
            path = self.path.split("?")[0].rstrip("/")
            try:
                if path == "/health":
                    self.send_json(200, {"status": "ok"})
                elif path == "/v1/models":
                    self.send_json(200, {"object": "list", "data": [completer.model_card()]})
                elif path.startswith("/v1/models/"):
                    completer.check_model(unquote(path.removeprefix("/v1/models/")))
                    self.send_json(200, completer.model_card())
                else:
                    raise self.no_route()
            except RequestError as err:
                self.send_failure(err)

        def send_failure(self, err: RequestError) -> None:
            self.send_json(err.status, err.body())

        def read_request(self) -> dict[str, Any]:
            if self.path.split("?")[0].rstrip("/") != "/v1/completions":
                raise self.no_route()
            if self.headers.get("Transfer-Encoding"):
                raise RequestError(
                    411, "send the body with a Content-Length header (chunked bodies are not read)"
                )
            length = self.headers.get("Content-Length") or "0"
            if not (length.isascii() and length.isdigit()):
                raise RequestError(400, f"the Content-Length header {length!r} is not a number")
            if int(length) > MAX_BODY:
                raise RequestError(413, f"the request body is over {MAX_BODY} bytes")
            data = self.rfile.read(int(length))
            if len(data) < int(length):
                raise ConnectionResetError(f"the client sent {len(data)} of {length} bytes and hung up")
            self.body_read = True
            return completer.parse(_json_body(data))

        def do_POST(self) -> None:
            self.body_read = False
            try:
                req = self.read_request()
            except RequestError as err:
                self.send_failure(err)
                return
            head = {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
            }
            head["model"] = completer.name
            finish: dict[str, Any] = {}
            with completer.lock:
                pieces = completer.pieces(req, finish)
                if req["stream"]:
                    self.stream(pieces, finish, head, req)
                    return
                try:
                    text = "".join(pieces)
                except Exception as exc:  # the model failed (out of memory, ...): say so rather than hang up
                    self.send_failure(RequestError(500, f"generation failed: {type(exc).__name__}: {exc}"))
                    raise
            choice = {"index": 0, "text": text, "finish_reason": finish["finish_reason"], "logprobs": None}
            self.send_json(200, {**head, "choices": [choice], "usage": _usage(req, finish["tokens"])})

        def stream(
            self, pieces: Iterator[str], finish: dict[str, Any], head: dict[str, Any], req: dict[str, Any]
        ) -> None:
            """Server-sent events, one per piece of text, then the finish reason, usage if asked, and [DONE]."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream ends when the connection does
            self.end_headers()
            self.close_connection = True

            def send(choices: list[dict[str, Any]], **extra: Any) -> None:
                event = json.dumps({**head, "choices": choices, **extra})
                self.wfile.write(f"data: {event}\n\n".encode())
                self.wfile.flush()

            try:
                for piece in pieces:
                    send([{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}])
                send([{"index": 0, "text": "", "finish_reason": finish["finish_reason"], "logprobs": None}])
                if req["usage_chunk"]:
                    send([], usage=_usage(req, finish["tokens"]))
            except (BrokenPipeError, ConnectionResetError):
                return  # the client went away: stop generating, free the model for the next request
            except Exception as exc:
                # the status (200) is already sent: the error goes into the stream, as OpenAI's server does
                error = RequestError(500, f"generation failed: {type(exc).__name__}: {exc}")
                self.wfile.write(f"data: {json.dumps(error.body())}\n\n".encode())
                traceback.print_exc()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def no_route(self) -> RequestError:
            return RequestError(
                404,
                f"no route {self.command} {self.path}: dsmoe serve answers GET /v1/models, GET /v1/models/MODEL, "
                "POST /v1/completions and GET /health (the exported tokenizer has no chat template, so there is "
                "no /v1/chat/completions)",
            )

    return Handler


def _usage(req: dict[str, Any], n: int) -> dict[str, int]:
    return {"prompt_tokens": len(req["ids"]), "completion_tokens": n, "total_tokens": len(req["ids"]) + n}


def serve(
    folder: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    log_level: str = "warning",
    name: str | None = None,
    settings: str | Path | None = None,
    compile: bool = False,
    quantize: str = "none",
    kernels: str = "auto",
) -> None:
    """Serve ``folder`` (written by ``dsmoe export``) until interrupted, as model ``name`` (default: ``folder`` as
    given). ``settings``: a per-layer sparse settings file (``dsmoe tune``) that replaces config.json's.
    ``compile``: decode through the compiled step (each new cache length, in steps of 64, compiles once).
    ``quantize``: 'int8' stores the projection weights as int8 and decodes compiled. ``kernels``: see
    ``dsmoe.inference.prepare``."""
    path = Path(folder)
    for needed in ("config.json", "tokenizer.json", "model.safetensors"):
        if not (path / needed).is_file():
            raise ConfigError(f"{path} has no {needed}; serve a folder written by `dsmoe export`")
    if settings is not None and not Path(settings).is_file():
        raise ConfigError(f"settings file {settings} does not exist; write one with `dsmoe tune`")
    completer = Completer(
        path, str(folder) if name is None else name, device, settings, compile, quantize, kernels
    )
    server = ThreadingHTTPServer(
        (host, port), make_handler(completer, log_level.lower() in ("debug", "info"))
    )
    server.daemon_threads = True
    print(
        f"serving {completer.name!r} at http://{host}:{server.server_address[1]}/v1 on {completer.device}, one "
        "completion at a time (Ctrl-C stops)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def cmd_serve(args: argparse.Namespace) -> int:
    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        log_level=args.log_level,
        settings=args.settings,
        compile=args.compile,
        quantize=args.quantize,
        kernels=args.kernels,
    )
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server for an exported model (/v1/completions, one request at a time)",
        description="Serve a folder written by `dsmoe export` over OpenAI's API: GET /v1/models, "
        "GET /v1/models/MODEL, POST /v1/completions (stream or not; temperature, top_p, stop, seed, max_tokens) "
        "and GET /health. A request's `model` must be exactly the --model string. It runs one completion at a "
        "time, the others waiting their turn: for concurrent serving use vLLM (vllm serve FOLDER "
        "--trust-remote-code). Greedy unless temperature > 0.",
    )
    p.add_argument("--model", required=True, help="a folder written by `dsmoe export`; also the model's name")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, auto")
    p.add_argument("--log-level", default="warning", help="info or debug logs each request")
    p.add_argument(
        "--settings",
        metavar="FILE",
        help="per-layer sparse settings (a JSON file from `dsmoe tune`) instead of config.json's",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help=COMPILE_HELP + " (the first request of each length waits for its compilation)",
    )
    add_quantize_arg(p, "serving; implies --compile")
    add_kernels_arg(p)
    p.set_defaults(func=cmd_serve)
