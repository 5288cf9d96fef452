"""Imports go one way: storage <- scheduler <- offload. Checked on the source (ast), so a lazy import inside a
function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["storage", "scheduler", "offload"]
FORBIDDEN = {"storage": {"scheduler", "offload"}, "scheduler": {"offload"}, "offload": set()}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.add(str(node.args[0].value).split(".")[0])
    return found


def _files(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


def test_every_layer_has_source():
    for layer in LAYERS:
        assert _files(layer), f"no .py files under {layer}/: the layer test would check nothing"


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_go_one_way(layer):
    bad = []
    for path in _files(layer):
        for pkg in sorted(_imported_packages(path) & FORBIDDEN[layer]):
            bad.append(f"{path.relative_to(ROOT)} imports {pkg}")
    assert not bad, (f"{layer} may not import {sorted(FORBIDDEN[layer])} (storage <- scheduler <- offload): "
                     + "; ".join(bad))


def test_checker_sees_every_import_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import a.b\nfrom c.d import e\nfrom . import f\ndef g():\n    import offload\n"
                   "importlib.import_module('scheduler.x')\n")
    assert _imported_packages(src) == {"a", "c", "offload", "scheduler"}
