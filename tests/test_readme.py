"""The README's Python example runs as written, and every `dsmoe` subcommand and flag its shell examples use exists
(their full runs fetch data and train, which other tests cover piece by piece)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_the_python_example_runs_as_written(tmp_path):
    (example,) = blocks("python")
    child = subprocess.run(
        [sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    active_params, active_hidden = map(float, child.stdout.split())
    assert active_params > 0 and 0 < active_hidden < 1


def dsmoe_commands() -> list[list[str]]:
    """Every `dsmoe ...` command line of the README's shell examples (continuation lines joined, comments cut)."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line.startswith("dsmoe "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_every_shell_example_names_a_real_subcommand_and_flags():
    from dsmoe.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    commands = dsmoe_commands()
    assert len(commands) > 10
    for argv in commands:
        sub = subparsers.get(argv[0])
        assert sub is not None, f"README: `dsmoe {' '.join(argv)}`: no subcommand {argv[0]!r}"
        known = {option for action in sub._actions for option in action.option_strings}
        flags = [a.split("=")[0] for a in argv[1:] if a.startswith("--")]
        unknown = [f for f in flags if f not in known and not getattr(sub, "pass_through", False)]
        if argv[0] != "lm-eval":  # passes its flags to lm_eval
            assert not unknown, f"README: `dsmoe {' '.join(argv)}`: {unknown} are not flags of {argv[0]}"
