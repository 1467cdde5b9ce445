"""The run schema has one home (core/schema.py) and the small shared helpers behave on edge cases."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core import schema
from core.errors import LayerLockError, first_line
from core.masking import n_keep, tube_mask
from core.tracking import sqlite_path

ROOT = Path(__file__).resolve().parents[1]
# Names specific enough that a literal copy anywhere else is a second definition.
SCHEMA_NAMES = {
    value
    for name, value in vars(schema).items()
    if isinstance(value, str)
    and name.isupper()
    and (name.startswith("TAG_") or name.endswith("_ARTIFACT") or value.count("/") == 1 and not value.endswith("/"))
} | {schema.MLFLOW_PARENT, schema.CHECKPOINT_DIR}


def literals(path: Path) -> list[tuple[str, int]]:
    """String constants of a file outside docstrings and f-string parts."""
    tree = ast.parse(path.read_text())
    skip = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    skip |= {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    return [
        (n.value, n.lineno)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip
    ]


def test_schema_names_are_written_once() -> None:
    assert {"layerlock.method", "train/loss", "val/loss_pixel", "layer_metrics.parquet", "checkpoints"} <= SCHEMA_NAMES
    copies = [
        f"{path.relative_to(ROOT)}:{line}: {value!r}"
        for layer in ("core", "analysis", "experiments", "app")
        for path in sorted((ROOT / layer).rglob("*.py"))
        if path != ROOT / "core" / "schema.py"
        for value, line in literals(path)
        if value in SCHEMA_NAMES
    ]
    assert copies == []


def test_block_and_checkpoint_names_round_trip() -> None:
    assert schema.block_key("cka_prev", 3) == "cka_prev/block_03"
    assert schema.checkpoint_artifact(1200) == "checkpoints/step_001200.pt"
    assert schema.checkpoint_step(schema.checkpoint_artifact(1200)) == 1200


@pytest.mark.parametrize(
    ("err", "line"),
    [
        (ValueError(""), "ValueError"),
        (ValueError("   \n  "), "ValueError"),
        (LayerLockError("first\nsecond"), "first"),
        (KeyError("x"), "'x'"),
    ],
)
def test_first_line_never_raises(err: BaseException, line: str) -> None:
    assert first_line(err) == line


def test_sqlite_path() -> None:
    assert sqlite_path("sqlite:///mlflow.db") == Path("mlflow.db")
    assert sqlite_path("sqlite:////abs/x.db?mode=ro") == Path("/abs/x.db")
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("http://host:5000") is None and sqlite_path("postgresql://h/db") is None


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9, 1.0])
def test_n_keep_matches_the_mask(ratio: float) -> None:
    grid = (2, 4, 4)
    keep, mask = tube_mask(3, grid, ratio)
    assert keep.shape[1] == n_keep(grid, ratio) and keep.shape[1] + mask.shape[1] == 32
    assert 2 <= keep.shape[1] <= 30  # at least one spatial position kept and one masked, in every frame
