"""Each package imports only downward: the model and its kernels import nothing above them; nothing imports cli."""

import ast
import pathlib

import dsmoe

PACKAGE = pathlib.Path(dsmoe.__file__).parent
# Lower number = lower layer. A module may import its own package and any package of a lower layer.
LAYER = {
    "config": 0,
    "version": 0,
    "files": 0,
    "model": 1,
    "kernels": 1,
    "data": 1,
    "training": 2,
    "inference": 3,  # prepares models from the checkpoints training writes
    "evaluation": 4,
    "bench": 4,
    "convert": 4,
    "hf": 5,
    "demo": 6,
    "cli": 7,
    "__init__": 7,  # the public API: imported by users, never by the package itself
    "__main__": 8,
}
# model and kernels share a layer: the model calls the kernels; kernels may read only these leaf modules.
KERNELS_MAY_IMPORT = {"dsmoe.model.routing", "dsmoe.model.settings", "dsmoe.model.rope"}


def imports_of(path):
    """The dsmoe modules a file imports, anywhere in it (function-level imports included)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "dsmoe":  # from dsmoe import kernels
            yield from (f"dsmoe.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dsmoe":
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "dsmoe")


def test_every_import_points_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        source = parts[0]
        assert source in LAYER, f"{path}: package {source} has no layer in this test"
        for module in imports_of(path):
            target = module.split(".")[1] if "." in module else "__init__"
            if target == source:
                continue
            if source == "kernels" and target == "model":
                ok = module in KERNELS_MAY_IMPORT
            elif source == "model" and target == "kernels":
                ok = True
            else:
                ok = LAYER[target] < LAYER[source]
            if not ok:
                upward.append(f"{'/'.join(parts)} imports {module}")
    assert not upward, "imports that point up:\n" + "\n".join(upward)
