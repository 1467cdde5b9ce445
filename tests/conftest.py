"""Shared fixtures: tiny configs and throwaway MLflow stores (helpers: ``tests/helpers.py``)."""

from __future__ import annotations

import os
import tempfile

import pytest

# Training runs keep a local folder (core.tracking.local_dir): in tests, under one throwaway folder
# (inherited by the commands tests start), never in runs/ of the repository.
os.environ["LAYERLOCK_RUNS_DIR"] = tempfile.mkdtemp(prefix="layerlock-test-runs-")
# Runs send to the store from a thread here: a sender process per run costs 2-3 s of CPU to start
# (it imports MLflow), ten minutes over this suite's runs on two cores. tests/test_nothing_lost.py,
# which takes stores away and kills trainers, runs with the default, the sender process.
os.environ["LAYERLOCK_SENDER"] = "thread"

from core.config import ExperimentConfig
from tests.helpers import TINY, OwnLoopStore, build_own_loop_store, run_cli, tiny_dict, tiny_sets  # noqa: F401


@pytest.fixture
def tiny_cfg() -> ExperimentConfig:
    return ExperimentConfig.model_validate(tiny_dict())


@pytest.fixture
def store(tmp_path) -> str:
    """A throwaway sqlite tracking URI."""
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(scope="session")
def own_loop_store(tmp_path_factory) -> OwnLoopStore:
    """The README example's two torchvision runs (ViT, video ResNet), trained once per session;
    the browser test builds its dashboard store in the same folder."""
    return build_own_loop_store(tmp_path_factory.mktemp("own-loop"))
