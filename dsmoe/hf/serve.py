"""``dsmoe serve``: an OpenAI-compatible HTTP server (``/v1/completions``, ``/v1/chat/completions``) for an exported
folder, on the CPU or a GPU, through transformers' own ``transformers serve``.

``transformers serve`` loads a model by looking ``config.architectures[0]`` up in the ``transformers`` namespace,
which only knows built-in models, so it cannot load remote-code models by itself. Before starting it, this module
makes that name resolve to ``AutoModelForCausalLM``, whose ``from_pretrained(..., trust_remote_code=True)`` follows
the folder's ``auto_map`` to its own ``modeling_dsmoe.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsmoe.config import ConfigError


def serve(
    folder: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    log_level: str = "warning",
) -> None:
    """Serve ``folder`` (written by ``dsmoe export``) until interrupted."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{folder} has no config.json; serve a folder written by `dsmoe export`")
    architecture = json.loads(config_file.read_text()).get("architectures", [None])[0]
    if not architecture:
        raise ConfigError(f"{config_file} names no architecture; re-export the model with `dsmoe export`")
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.cli.serve import Serve
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ConfigError("serving needs fastapi, uvicorn, pydantic and openai: pip install 'dsmoe[hf]'")
    if not hasattr(transformers, architecture):
        setattr(transformers, architecture, AutoModelForCausalLM)
    Serve(
        force_model=str(folder.resolve()),
        trust_remote_code=True,
        device=device,
        dtype="auto",
        host=host,
        port=port,
        log_level=log_level,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    serve(args.model, host=args.host, port=args.port, device=args.device, log_level=args.log_level)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server for an exported model (transformers serve)")
    p.add_argument("--model", required=True, help="a folder written by `dsmoe export`")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, auto")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_serve)
