"""`dsmoe generate`: the printed continuation is the native model's greedy (or seeded) one, eager, compiled and
with int8 weights; bad arguments get one clear error before any weights load."""

import pytest
import torch

from dsmoe.cli import main
from dsmoe.data.tokenizer import eos_id
from dsmoe.inference.generate import generate
from dsmoe.inference.quantize import quantize
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.training.checkpoint import load_pretrained

PROMPT = "The river"


def native(checkpoint, n: int, int8: bool = False) -> str:
    model, tokenizer = load_pretrained(checkpoint)
    plan = SparsePlan.build(model.cfg, mlp=SparseSetting("topk", k=2))
    if int8:
        quantize(model)
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    new = generate(model, ids, n, eos_token_id=eos_id(tokenizer), plan=plan)[0, ids.shape[1] :]
    return PROMPT + tokenizer.decode(new.tolist())


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.usefixtures("int8_on_this_cpu")
def test_generate_prints_the_native_greedy_continuation(tiny_checkpoint, capsys):
    base = ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "10"]
    base += ["--strategy", "topk", "--k", "2"]
    expected = native(tiny_checkpoint, 10)
    for extra in ([], ["--compile"]):
        assert main(base + extra) == 0
        assert capsys.readouterr().out == expected + "\n"
    assert main(base + ["--quantize", "int8"]) == 0
    assert capsys.readouterr().out == native(tiny_checkpoint, 10, int8=True) + "\n"
    assert main(base + ["--temperature", "0.9", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(base + ["--temperature", "0.9", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first and first.startswith(PROMPT)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--temperature", "-1"], "--temperature >= 0"),
        (["--max-new-tokens", "100000"], "max_seq_len"),
        (["--k", "2"], "--k needs --strategy"),
    ],
)
def test_generate_errors_name_the_problem(tiny_checkpoint, capsys, argv, message):
    code = main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", PROMPT, *argv])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiling_says_so_first(tiny_checkpoint, capsys):
    argv = ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "2"]
    assert main([*argv, "--compile"]) == 0
    assert capsys.readouterr().err.startswith("compiling the decode step (first call")
    assert main(argv) == 0
    assert "compiling" not in capsys.readouterr().err
