"""Pure analysis of logged runs: load, convergence, schedules, FLOPs, comparison.

Modules: ``io`` (the store: the only one that talks to MLflow, it returns the records of
``records``), and pure functions of those records: ``convergence``, ``schedule``, ``flops``,
``timing`` (predicted wall saving), ``compare``, ``stats``, ``claims`` (a study's estimates and
verdicts), ``study_figures`` (a study's Plotly figures, from its results), ``agreement``;
``testing`` (runs with known convergence, for tests and benches); ``attribution`` (captum) is the
only one that imports torch. No submodule is imported here, so that importing one does not pull
in the others (and ``mlflow``/``scipy``) at start-up.

The dashboard (``app``) imports ``analysis`` only, never ``core`` (docs/architecture.md,
"Layers"): what it needs from core -- the error type users can fix, the run schema and the
metric descriptions, the config check, a tracking URI usable from any working directory
(``absolute_uri``, for the processes the dashboard launches) -- is re-exported here. These core
modules are plain Python (no torch).
"""

from __future__ import annotations

from typing import Any

from core import schema
from core.errors import LayerLockError, first_line
from core.schema import HELDOUT_KEY, METRIC_HELP, metric_help
from core.tracking import absolute_uri


def load_config(path: Any, overrides: list[str] | None = None) -> Any:
    """``core.config.load_config`` (imported on first use: pydantic and yaml load lazily)."""
    from core.config import load_config as load

    return load(path, overrides)


__all__ = [
    "HELDOUT_KEY",
    "METRIC_HELP",
    "LayerLockError",
    "absolute_uri",
    "first_line",
    "load_config",
    "metric_help",
    "schema",
]
