"""The single-file code generator refuses what it cannot flatten correctly."""

import pytest

from dsmoe.hf import bundle
from dsmoe.hf.bundle import BundleError, bundle_source


def fake_package(tmp_path, monkeypatch, files):
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.setattr(bundle, "module_path", lambda name: tmp_path / f"{name.split('.')[-1]}.py")


def test_flattens_imports_aliases_and_namespaces(tmp_path, monkeypatch):
    fake_package(
        tmp_path,
        monkeypatch,
        {
            "a": '"""doc"""\nimport math\n\n\ndef area(r):\n    return math.pi * r * r\n',
            "ops": "from dsmoe.a import area as surface\n\n__all__ = ['surface']\n",
            "b": "import math\nfrom dsmoe import ops\n\n\n@staticmethod\ndef twice(r):\n    return 2 * ops.surface(r)\n",
        },
    )
    source = bundle_source(("dsmoe.a", "dsmoe.ops", "dsmoe.b"))
    assert source.count("import math") == 1 and "@staticmethod" in source
    namespace = {}
    exec(compile(source, "bundle", "exec"), namespace)
    assert namespace["twice"].__func__(1.0) == pytest.approx(2 * 3.141592653589793)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a": "X = 1\n", "b": "X = 2\n"}, "'X' is defined at top level in both dsmoe.a and dsmoe.b"),
        ({"a": "X = 1\n", "b": "from dsmoe.c import Y\n"}, "imports 'Y' from dsmoe.c, which is not bundled"),
        ({"a": "X = 1\n", "b": "def f():\n    from dsmoe.a import X\n    return X\n"}, "inside a function"),
    ],
)
def test_rejects_what_it_cannot_flatten(tmp_path, monkeypatch, files, message):
    fake_package(tmp_path, monkeypatch, files)
    with pytest.raises(BundleError, match=message):
        bundle_source(("dsmoe.a", "dsmoe.b"))
