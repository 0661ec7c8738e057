"""``dsmoe export``: a training checkpoint -> a Hugging Face folder that loads anywhere with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, with no dsmoe installed.

The folder holds model.safetensors, config.json (with ``auto_map``), generation_config.json, the tokenizer as a
``PreTrainedTokenizerFast`` and ``modeling_dsmoe.py``, generated from the package's modules (see ``bundle.py``). The
weights are saved through the generated code itself, so an export that succeeds has already run it once.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

from dsmoe.config import ConfigError
from dsmoe.convert.to_gguf import GGUF_TYPES, GGUFLayout, gguf_layout
from dsmoe.files import apply_umask, temp_folder
from dsmoe.hf.bundle import MODELING_FILE, bundle_source
from dsmoe.model.plan import LayerSettings, SparsePlan


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    att: LayerSettings = None,
    mlp: LayerSettings = None,
    plan: SparsePlan | None = None,
    tokenizer_file: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the Hugging Face folder ``out`` from the dsmoe checkpoint folder ``checkpoint``.

    The sparse-inference settings stored in config.json: ``plan``, or ``att`` / ``mlp`` (one for every layer or a
    list with one per layer; None: the trained behaviour).
    ``tokenizer_file``: a tokenizer.json to use when the checkpoint carries none.
    """
    from tokenizers import Tokenizer

    from dsmoe.inference.prepare import prepare
    from dsmoe.training.checkpoint import checkpoint_config

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give the path of a folder to write")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    if plan is None:
        plan = SparsePlan.build(checkpoint_config(checkpoint), att, mlp)
    elif att is not None or mlp is not None:
        raise ValueError("give the settings as a plan or as att / mlp, not both")
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise ConfigError(f"--tokenizer {tokenizer_file} is not a file; pass a tokenizer.json")
    if tokenizer_file is None and not (Path(checkpoint) / "tokenizer.json").is_file():
        raise ConfigError(
            f"checkpoint {checkpoint} has no tokenizer.json; pass --tokenizer PATH/tokenizer.json"
        )
    prepared = prepare(checkpoint, plan, onednn=False)  # the weights are written as they were trained
    native, tokenizer, plan = prepared.model, prepared.tokenizer, prepared.plan
    if tokenizer_file is not None:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))

    tmp = temp_folder(out)
    try:
        code = tmp / ".code"
        code.mkdir()
        (code / MODELING_FILE).write_text(bundle_source())
        _save_through_bundle(code / MODELING_FILE, native, tokenizer, plan, tmp)
        shutil.rmtree(code)
        apply_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_through_bundle(code_file: Path, native, tokenizer, plan: SparsePlan, folder: Path) -> None:
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from dsmoe.data.tokenizer import eos_id

    eos = eos_id(tokenizer)
    bundle = _load_module(code_file)
    try:
        config = bundle.DSMoEConfig.from_model_config(
            native.cfg,
            bos_token_id=eos,
            eos_token_id=eos,
            dtype=native.embed.weight.dtype,
            **plan.fields(),
        )
        import torch

        with torch.device("meta"):
            model = bundle.DSMoEForCausalLM(config)
        model.model.load_state_dict(native.state_dict(), strict=True, assign=True)
        model.model.rope_cos, model.model.rope_sin = native.rope_cos, native.rope_sin
        config.register_for_auto_class()
        model.register_for_auto_class("AutoModelForCausalLM")
        model.save_pretrained(folder)  # copies modeling_dsmoe.py and writes auto_map
    finally:
        sys.modules.pop(bundle.__name__, None)
    eos_token = tokenizer.id_to_token(eos)
    # Padding on the left with the end-of-text token: batched generate / pipeline over prompts of different lengths
    # then works out of the box (the model masks padding anywhere; see modeling.py).
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=eos_token,
        eos_token=eos_token,
        pad_token=eos_token,
        padding_side="left",
        model_max_length=native.cfg.max_seq_len,
    )
    hf_tokenizer.save_pretrained(folder)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False).save_pretrained(
        folder
    )


def _load_module(path: Path):
    """Import the generated file as module ``modeling_dsmoe`` (the name transformers records in auto_map)."""
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and inspect.getfile look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def export_gguf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    plan: SparsePlan | None = None,
    tokenizer_file: str | Path | None = None,
    overwrite: bool = False,
    dtype: str = "f32",
) -> GGUFLayout:
    """Write the GGUF file ``out`` (llama.cpp) from the checkpoint folder under ``plan``; returns its layout (see
    ``dsmoe.convert.to_gguf``). Whether llama.cpp can run the model is checked before any weight loads."""
    from tokenizers import Tokenizer

    from dsmoe.convert.to_gguf import write_gguf
    from dsmoe.training.checkpoint import checkpoint_config, load_pretrained

    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; with --gguf give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise ConfigError(f"--tokenizer {tokenizer_file} is not a file; pass a tokenizer.json")
    cfg = checkpoint_config(checkpoint)
    plan = plan or SparsePlan.build(cfg)
    gguf_layout(cfg, plan)
    model, tokenizer = load_pretrained(checkpoint)
    if tokenizer_file is not None:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return write_gguf(model, tokenizer, plan, out, dtype=dtype, name=Path(checkpoint).resolve().name)


def cmd_export(args: argparse.Namespace) -> int:
    from dsmoe.inference.arguments import plan_from_args
    from dsmoe.training.checkpoint import checkpoint_config

    # as trained where no strategy is given; --settings: one per layer, written into config.json as lists
    plan = plan_from_args(args, checkpoint_config(args.checkpoint))
    if args.gguf:
        layout = export_gguf(
            args.checkpoint,
            args.out,
            plan=plan,
            tokenizer_file=args.tokenizer,
            overwrite=args.overwrite,
            dtype=args.gguf_type,
        )
        experts = f", {layout.n_expert_used} experts per token" if layout.n_expert_used else ""
        print(f"exported {args.checkpoint} -> {args.out} (llama.cpp architecture {layout.arch}{experts})")
        print(f"run with: llama-cli -m {args.out}   (quantize: llama-quantize {args.out} OUT.gguf Q8_0)")
        return 0
    out = export(
        args.checkpoint, args.out, plan=plan, tokenizer_file=args.tokenizer, overwrite=args.overwrite
    )
    print(f"exported {args.checkpoint} -> {out}")
    print(f"load with: AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)")
    return 0


def add_commands(sub) -> None:
    from dsmoe.inference.arguments import add_sparse_args

    p = sub.add_parser(
        "export", help="write a Hugging Face folder (trust_remote_code), or with --gguf a llama.cpp file"
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder written by `dsmoe train`")
    p.add_argument(
        "--out", required=True, help="the Hugging Face folder to write (with --gguf: the .gguf file)"
    )
    p.add_argument(
        "--gguf",
        action="store_true",
        help="write one GGUF file for llama.cpp (SwiGLU/RMSNorm models, dense attention, top-k MLP experts)",
    )
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="f32", help="the matrices' storage with --gguf")
    p.add_argument("--tokenizer", help="tokenizer.json to use when the checkpoint has none")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_sparse_args(p)
    p.set_defaults(func=cmd_export)
