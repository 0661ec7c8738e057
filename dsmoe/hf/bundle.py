"""Generate the single-file modelling code that an exported folder carries for ``trust_remote_code`` loading.

One source of truth: the file is produced mechanically, at export time, from the package's own modules (listed in
``BUNDLED_MODULES`` in dependency order). Each module's top-level code is copied as it is; third-party imports are
hoisted and de-duplicated; imports between bundled modules are dropped, since the names then live in one namespace.
``from dsmoe import kernels`` (a module imported as a namespace) becomes a ``SimpleNamespace`` of that module's
``__all__``. Anything the generator cannot prove correct -- a name defined twice, a ``dsmoe`` import of a module or
name not bundled, a ``dsmoe`` import inside a function -- is an error naming the module and the fix.
"""

from __future__ import annotations

import ast
from pathlib import Path

BUNDLED_MODULES = (
    "dsmoe.config",
    "dsmoe.model.settings",
    "dsmoe.model.plan",
    "dsmoe.model.settings_file",
    "dsmoe.model.routing",
    "dsmoe.model.rope",
    "dsmoe.kernels.onednn",
    "dsmoe.kernels.reference",
    "dsmoe.kernels.cpu",
    "dsmoe.kernels.static",
    "dsmoe.kernels.triton_kernels",
    "dsmoe.kernels.triton_fused",
    "dsmoe.kernels",
    "dsmoe.model.router",
    "dsmoe.model.losses",
    "dsmoe.model.experts",
    "dsmoe.model.attention",
    "dsmoe.model.transformer",
    "dsmoe.model.weights",
    "dsmoe.inference.meter",
    "dsmoe.inference.generate",
    "dsmoe.hf.configuration",
    "dsmoe.hf.modeling",
)
MODELING_FILE = "modeling_dsmoe.py"


class BundleError(RuntimeError):
    """The package's modules cannot be flattened into one file; the message names the module and the fix."""


def module_path(name: str) -> Path:
    root = Path(__file__).resolve().parents[2]  # the folder that holds the dsmoe package
    path = root / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    return []


def _is_dsmoe(module: str | None) -> bool:
    return module is not None and (module == "dsmoe" or module.startswith("dsmoe."))


def bundle_source(modules: tuple[str, ...] = BUNDLED_MODULES) -> str:
    """The source of one self-contained module holding ``modules``' code, in order."""
    header_imports: list[str] = []
    body: list[str] = []
    defined: dict[str, str] = {}  # top-level name -> bundled module that defines it
    exports: dict[str, list[str]] = {}  # bundled module -> its __all__

    def define(name: str, where: str, binding: str | None = None) -> None:
        """``binding``: what an import alias stands for; the same alias may then be repeated by several modules."""
        where = binding or where
        if name in defined and defined[name] != where:
            raise BundleError(
                f"'{name}' is defined at top level in both {defined[name]} and {where}; rename one "
                "of them (the exported modelling file puts all bundled modules in one namespace)"
            )
        defined[name] = where

    for name in modules:
        source = module_path(name).read_text()
        tree = ast.parse(source)
        lines = source.splitlines(keepends=True)
        body.append(f"\n\n# {'-' * 40} {name} {'-' * 40}\n")
        end = 0
        for i, node in enumerate(tree.body):
            # A statement's text runs from the end of the previous one: decorators and comments come with it.
            if node.end_lineno is None:  # ast.parse sets it on every statement
                raise BundleError(f"{name}: statement at line {node.lineno} has no end line")
            start, end = end, node.end_lineno
            text = "".join(lines[start:end]).strip("\n")
            if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # module docstring
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            for inner in ast.walk(node):
                if (
                    inner is not node
                    and isinstance(inner, (ast.Import, ast.ImportFrom))
                    and _is_dsmoe(getattr(inner, "module", None) or inner.names[0].name)
                ):
                    raise BundleError(
                        f"{name} imports dsmoe inside a function or block (line {inner.lineno}); "
                        "bundled modules must import dsmoe names at top level"
                    )
            if isinstance(node, ast.Import) and any(_is_dsmoe(a.name) for a in node.names):
                raise BundleError(
                    f"{name}: 'import dsmoe...' (line {node.lineno}); use 'from dsmoe.x import y'"
                )
            if isinstance(node, ast.ImportFrom) and _is_dsmoe(node.module):
                body.extend(_resolve_dsmoe_import(node, name, defined, exports))
                for a in node.names:
                    target = f"{node.module}.{a.name}"
                    if target in exports or (a.asname and a.asname != a.name):
                        define(a.asname or a.name, name, binding=f"alias of {target}")
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for statement in _single_imports(node):
                    if statement not in header_imports:
                        header_imports.append(statement)
                continue
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
                exports[name] = list(ast.literal_eval(node.value))
                continue
            for defined_name in _defined_names(node):
                define(defined_name, name)
            body.append("\n\n" + text + "\n")
        exports.setdefault(name, [])

    head = [
        f'"""DS-MoE modelling code for transformers (trust_remote_code), generated by `dsmoe export` from dsmoe '
        f'{_version()} ({len(modules)} modules). Do not edit: regenerate it with `dsmoe export`."""\n',
        "from __future__ import annotations\n",
        *sorted(header_imports, key=_import_order),
        "from types import SimpleNamespace as _BundledModule\n",
    ]
    source = "\n".join(head) + "".join(body)
    compile(source, MODELING_FILE, "exec")
    return source


def _resolve_dsmoe_import(node: ast.ImportFrom, where: str, defined: dict, exports: dict) -> list[str]:
    """Statements that replace ``from dsmoe.x import a, b as c`` in the flat namespace."""
    lines = []
    for alias in node.names:
        submodule = f"{node.module}.{alias.name}"
        if submodule in exports:  # a bundled module imported as a namespace
            items = ", ".join(f"{n}={n}" for n in exports[submodule])
            if not exports[submodule]:
                raise BundleError(
                    f"{where} imports module {submodule} as a namespace, which needs an __all__ list"
                )
            lines.append(f"{alias.asname or alias.name} = _BundledModule({items})\n")
            continue
        if alias.name not in defined:
            raise BundleError(
                f"{where} imports '{alias.name}' from {node.module}, which is not bundled before it; "
                "add that module to dsmoe.hf.bundle.BUNDLED_MODULES (in dependency order)"
            )
        if alias.asname and alias.asname != alias.name:
            lines.append(f"{alias.asname} = {alias.name}\n")
    return lines


def _single_imports(node: ast.Import | ast.ImportFrom) -> list[str]:
    """One statement per imported name, so that overlapping imports of different modules de-duplicate."""

    def one(alias: ast.alias) -> str:
        return alias.name + (f" as {alias.asname}" if alias.asname else "")

    if isinstance(node, ast.Import):
        return [f"import {one(a)}" for a in node.names]
    return [f"from {'.' * node.level}{node.module or ''} import {one(a)}" for a in node.names]


def _import_order(text: str) -> tuple[int, str]:
    return (0 if text.startswith("import ") else 1, text)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsmoe")
    except PackageNotFoundError:
        return "unknown"
