"""The direction of imports (docs/architecture.md, "Layers"), checked on the source text.

``app -> analysis -> core`` and ``experiments -> analysis, core``: ``core`` imports none of the
other layers, ``analysis`` imports only ``core``, ``app`` only ``analysis`` (what it needs from
core is re-exported by ``analysis/__init__.py``), ``experiments`` never ``app``. In ``analysis``
only ``attribution.py`` (captum) imports torch. Every import counts, also those inside functions.

No import circle among the product modules of all four layers; in ``analysis`` only the store
module ``io.py`` reads MLflow (and ``testing.py``, which logs synthetic runs, and the command
line): no other module takes a tracking URI.
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


# ----------------------------------------------------------------------------- import circles


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT, layers: tuple[str, ...] = LAYERS) -> dict[str, set[str]]:
    """Module -> the product modules it imports (anywhere in the file). ``from a import b`` is an
    edge to ``a.b`` when that is a module, else to ``a``."""
    files = {module_name(p, root): p for layer in layers for p in sorted((root / layer).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files else node.module
                    for alias in node.names
                ]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan), each a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_product_modules() -> None:
    assert [sorted(c) for c in import_cycles(import_graph())] == []


def test_the_cycle_check_sees_circles(tmp_path: Path) -> None:
    """A circle through a function-level import and ``from pkg import module`` is found; a chain is not."""
    pkg = tmp_path / "analysis"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from analysis import b\n")
    (pkg / "b.py").write_text("def f():\n    import analysis.c\n")
    (pkg / "c.py").write_text("from analysis.a import thing\n")
    (pkg / "d.py").write_text("import analysis.a\n")
    graph = import_graph(tmp_path, ("analysis",))
    assert graph["analysis.a"] == {"analysis.b"} and graph["analysis.d"] == {"analysis.a"}
    assert import_cycles(graph) == [frozenset({"analysis.a", "analysis.b", "analysis.c"})]


# ----------------------------------------------------------------------------- the store module

STORE_READERS = {"analysis/io.py", "analysis/testing.py", "analysis/__main__.py"}


def test_only_the_store_module_reads_the_store() -> None:
    """Outside ``io.py`` (and ``testing.py``, the command line), no analysis module imports
    ``analysis.io`` or mlflow, and no function takes a tracking URI: they are pure functions of
    the records ``io`` returns."""
    found = []
    for path in sources("analysis"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in STORE_READERS:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for module, line in imported_modules(path):
            if module in ("analysis.io", "mlflow") or module.startswith("mlflow."):
                found.append(f"{rel}:{line}: imports {module}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "analysis"
                and any(a.name == "io" for a in node.names)
            ):
                found.append(f"{rel}:{node.lineno}: imports analysis.io")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                found += [f"{rel}:{node.lineno}: {node.name}({n}=...)" for n in names if n in ("uri", "tracking_uri")]
    assert found == []
