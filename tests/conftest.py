"""Shared fixtures: tiny configs and throwaway MLflow stores (helpers: ``tests/helpers.py``)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Training runs keep a local folder (core.tracking.local_dir): in tests, under one throwaway folder
# (inherited by the commands tests start), never in runs/ of the repository.
os.environ["LAYERLOCK_RUNS_DIR"] = tempfile.mkdtemp(prefix="layerlock-test-runs-")

from core.config import ExperimentConfig  # noqa: E402
from tests.helpers import TINY, run_cli, tiny_dict, tiny_sets  # noqa: E402, F401  (shared helpers live in helpers.py)


@pytest.fixture
def tiny_cfg() -> ExperimentConfig:
    return ExperimentConfig.model_validate(tiny_dict())


@pytest.fixture
def store(tmp_path) -> str:
    """A throwaway sqlite tracking URI."""
    return f"sqlite:///{tmp_path}/mlflow.db"
