"""The direction of imports (docs/architecture.md, "Layers"), checked on the source text.

``app -> analysis -> core`` and ``experiments -> analysis, core``: ``core`` imports none of the
other layers, ``analysis`` imports only ``core``, ``app`` only ``analysis`` (what it needs from
core is re-exported by ``analysis/__init__.py``), ``experiments`` never ``app``. In ``analysis``
only ``attribution.py`` (captum) imports torch. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "analysis", "experiments", "app")
ALLOWED = {
    "core": set(),
    "analysis": {"core"},
    "app": {"analysis"},
    "experiments": {"analysis", "core"},
}
TORCH_IN_ANALYSIS = {"analysis/attribution.py"}


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported anywhere in a file, with their line numbers."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            out.append(("." * node.level + (node.module or ""), node.lineno))
    return out


def sources(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


def violations(layer: str) -> list[str]:
    found = []
    for path in sources(layer):
        rel = path.relative_to(ROOT).as_posix()
        for module, line in imported_modules(path):
            top = module.split(".")[0]
            if module.startswith("."):
                found.append(f"{rel}:{line}: relative import {module} (use absolute imports)")
            elif top in LAYERS and top != layer and top not in ALLOWED[layer]:
                found.append(f"{rel}:{line}: {layer} imports {module}")
            elif layer == "analysis" and top == "torch" and rel not in TORCH_IN_ANALYSIS:
                found.append(f"{rel}:{line}: torch outside {sorted(TORCH_IN_ANALYSIS)}")
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_follow_the_layers(layer: str) -> None:
    assert sources(layer), f"no sources found under {layer}/"
    assert violations(layer) == []


def test_the_check_sees_violations(tmp_path: Path) -> None:
    """The scanner finds imports at module level, inside functions and ``from x import y``."""
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom core.model import VideoMAE\n\ndef f():\n    import app.views.charts\n")
    assert imported_modules(src) == [("os", 1), ("core.model", 2), ("app.views.charts", 5)]


def test_attribution_is_the_one_torch_module_in_analysis() -> None:
    path = ROOT / "analysis" / "attribution.py"
    assert any(m.split(".")[0] == "torch" for m, _ in imported_modules(path))
