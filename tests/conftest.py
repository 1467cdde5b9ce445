"""Shared fixtures: tiny configs and throwaway MLflow stores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.config import ExperimentConfig  # noqa: E402

TINY = {
    "model": {"depth": 4, "dim": 24, "heads": 2, "decoder_dim": 16, "decoder_heads": 2, "patch_size": 8},
    "data": {"frames": 4, "size": 16, "train_clips": 64, "val_clips": 16},
    "probe": {"every": 4, "batch_size": 8, "tokens_per_clip": 4},
    "train": {"steps": 12, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 2},
}


def tiny_dict(**sections) -> dict:
    out = {k: dict(v) for k, v in TINY.items()}
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


@pytest.fixture
def tiny_cfg() -> ExperimentConfig:
    return ExperimentConfig.model_validate(tiny_dict())


@pytest.fixture
def store(tmp_path) -> str:
    """A throwaway sqlite tracking URI."""
    return f"sqlite:///{tmp_path}/mlflow.db"


def run_cli(*args: str, env: dict | None = None, timeout: int = 300):
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def tiny_sets(**overrides) -> list[str]:
    """The tiny config as ``--set`` arguments for the command line."""
    tree = tiny_dict()
    flat = {f"{sec}.{k}": v for sec, vals in tree.items() for k, v in vals.items()}
    flat.update(overrides)
    out: list[str] = []
    for k, v in flat.items():
        out += ["--set", f"{k}={v}"]
    return out
