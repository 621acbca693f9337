"""Imports go one way (README "Design notes"): each package imports only the layers before it, so a lower layer can
be used, tested and replaced without the ones above it. Entry points (``__main__`` modules, `cli/`, `export.py`,
`train.py`) and the package's front door (`__init__.py`) may import anything."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "src" / "anime_role_detect"

#: the README's order; a package may import its own layer and the ones before it
LAYERS: list[set[str]] = [
    {"errors", "fsutil", "log", "imageio", "confutil", "versionfiles", "procgroup"},
    {"registry"},
    {"data"},
    {"models"},
    {"recognition"},
    {"training"},
    {"workflow", "fusion"},
    {"serve"},
]
ENTRY_POINTS = {"cli", "export", "train", "__init__", "__main__"}


def _top(path: Path) -> str:
    return path.relative_to(PKG).parts[0].removesuffix(".py")


def _imported_packages(path: Path) -> set[str]:
    """Top-level subpackages of anime_role_detect that `path` imports (relative or absolute, at any depth)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*node.module.split(".")) if node.module else base
            parts = target.relative_to(PKG).parts if target.is_relative_to(PKG) else ()
            out |= {parts[0].removesuffix(".py")} if parts else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("anime_role_detect."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("anime_role_detect.")}
    return out


def test_every_package_has_a_layer():
    tops = {_top(p) for p in PKG.rglob("*.py")} - ENTRY_POINTS
    assert tops <= set().union(*LAYERS), f"place {sorted(tops - set().union(*LAYERS))} in LAYERS and the README's order"


def test_imports_go_one_way():
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        src = _top(path)
        if src in ENTRY_POINTS or path.name == "__main__.py":
            continue
        for dst in _imported_packages(path) - {src}:
            if dst in ENTRY_POINTS or layer_of.get(dst, -1) > layer_of[src]:
                wrong.append(f"{path.relative_to(PKG)} imports {dst}")
    assert not wrong, "imports that reach up a layer: " + "; ".join(wrong)
