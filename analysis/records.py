"""What the analysis reads of a run, as plain values: the records ``analysis.io`` returns and
the tidy frames built from them. No store access here (``analysis.io`` is the one module that
talks to MLflow); every other analysis module works on these.

- :class:`RunRecord`: one run's snapshot (tags, params, latest metrics, status, times).
- :class:`RunData`: a record plus the parts of the run :func:`analysis.io.load_run` read (history,
  layer metrics, FLOP and time models, schedule, the run its schedule was derived from); a
  part that was not read raises instead of reading as "the run has none".
- :class:`GroupSpec`, :class:`FreezeTestRuns`: the runs a comparison or a freeze test is made of.
- Tidy frames: layer metrics ``run_id, step, block, metric, value``; run-level history
  ``run_id, step, metric, value``; run tables with ``RUN_COLUMNS``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core import schema
from core.errors import LayerLockError
from core.schema import (
    TAG_DATASET,
    TAG_FAILURE,
    TAG_FREEZE_BLOCKS,
    TAG_FREEZE_STEP,
    TAG_FREEZE_VARIANT,
    TAG_GROUP,
    TAG_METHOD,
    TAG_PARENT,
    TAG_SCHEDULE_SOURCE,
    VARIANT_PREFIX,
)

# One path component, then ``block_<digits>``: ``eval/digit/block_03/acc`` does not match.
_BLOCK_KEY = re.compile(r"^(?P<metric>[A-Za-z0-9_.-]+)/block_(?P<block>\d+)$")
# Final-probe evaluation keys ``eval/<task>/<metric>``; per-block probes have one more level.
_FINAL_EVAL_KEY = re.compile(r"^eval/[^/]+/[^/]+$")

LAYER_COLUMNS = ["run_id", "step", "block", "metric", "value"]
HISTORY_COLUMNS = ["run_id", "step", "metric", "value"]
RUN_COLUMNS = [
    "run_id",
    "experiment",
    "name",
    "status",
    "method",
    "dataset",
    "start_time",
    "end_time",
    "steps",
    "final_loss",
    "schedule_source",
    "parent",
    "failure_reason",
    "group",
    "seed",
]


def parse_block_key(key: str) -> tuple[str, int] | None:
    """Inverse of :func:`block_key`: ``"cka_final/block_03" -> ("cka_final", 3)``; None otherwise."""
    m = _BLOCK_KEY.match(key)
    return (m["metric"], int(m["block"])) if m else None


@dataclass(frozen=True)
class RunRecord:
    """What the analysis needs to know about one run (a plain snapshot, no MLflow objects).

    ``metrics`` holds the latest value of every run metric; ``tags`` include MLflow's own
    ``mlflow.*`` tags.
    """

    run_id: str
    name: str
    experiment: str
    experiment_id: str
    status: str
    start_time: pd.Timestamp | None
    end_time: pd.Timestamp | None
    artifact_uri: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def method(self) -> str | None:
        return self.tags.get(TAG_METHOD)

    @property
    def dataset(self) -> str | None:
        return self.tags.get(TAG_DATASET)

    @classmethod
    def from_mlflow(cls, run: Any, experiment_name: str) -> RunRecord:
        """The snapshot of an ``mlflow.entities.Run`` (``analysis.io`` reads it)."""
        info, data = run.info, run.data
        return cls(
            run_id=info.run_id,
            name=info.run_name or "",
            experiment=experiment_name,
            experiment_id=info.experiment_id,
            status=info.status,
            start_time=_timestamp(info.start_time),
            end_time=_timestamp(info.end_time),
            artifact_uri=info.artifact_uri,
            tags=dict(data.tags),
            params=dict(data.params),
            metrics=dict(data.metrics),
        )

    def param_int(self, key: str) -> int | None:
        """A param parsed as int (params are stored as strings), None if absent or not a number."""
        try:
            return int(float(self.params[key]))
        except (KeyError, ValueError, TypeError):
            return None


def _timestamp(ms: int | None) -> pd.Timestamp | None:
    """MLflow's milliseconds since the epoch (0 or None: not set)."""
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def eval_metrics(metrics: dict[str, float], include_block_evals: bool = False) -> dict[str, float]:
    """The ``eval/<task>/<metric>`` entries of a metrics dict (plus per-block ones if asked)."""
    return {
        k: v
        for k, v in metrics.items()
        if k.startswith(schema.EVAL) and (include_block_evals or _FINAL_EVAL_KEY.match(k))
    }


def runs_frame(records: Sequence[RunRecord], include_block_evals: bool = False) -> pd.DataFrame:
    """One row per run with RUN_COLUMNS, then the ``eval/*`` columns in sorted order."""
    rows = []
    for r in records:
        row: dict[str, Any] = {
            "run_id": r.run_id,
            "experiment": r.experiment,
            "name": r.name,
            "status": r.status,
            "method": r.method,
            "dataset": r.dataset,
            "start_time": r.start_time,
            "end_time": r.end_time,
            "steps": r.param_int("train.steps"),
            "final_loss": r.metrics.get(schema.LOSS, np.nan),
            "schedule_source": r.tags.get(TAG_SCHEDULE_SOURCE),
            "parent": r.tags.get(TAG_PARENT),
            "failure_reason": r.tags.get(TAG_FAILURE),
            "group": r.tags.get(TAG_GROUP),
            "seed": r.param_int("train.seed"),
        }
        row.update(eval_metrics(r.metrics, include_block_evals))
        rows.append(row)
    frame = pd.DataFrame(rows)
    eval_cols = sorted(c for c in frame.columns if c not in RUN_COLUMNS)
    frame = frame.reindex(columns=RUN_COLUMNS + eval_cols)
    frame["steps"] = frame["steps"].astype("Int64")
    frame["seed"] = frame["seed"].astype("Int64")
    frame["final_loss"] = frame["final_loss"].astype(float)
    for col in ("start_time", "end_time"):
        frame[col] = pd.to_datetime(frame[col], utc=True)
    return frame


def children_frame(records: Sequence[RunRecord]) -> pd.DataFrame:
    frame = runs_frame(records)
    by_id = {r.run_id: r for r in records}

    def tag_int(run_id: str, key: str) -> int | None:
        try:
            return int(by_id[run_id].tags[key])
        except (KeyError, ValueError):
            return None

    frame["freeze_step"] = pd.array([tag_int(r, TAG_FREEZE_STEP) for r in frame["run_id"]], dtype="Int64")
    frame["freeze_blocks"] = pd.array([tag_int(r, TAG_FREEZE_BLOCKS) for r in frame["run_id"]], dtype="Int64")
    # Children from before the variants carry no variant tag: they are the prefix test.
    frame["freeze_variant"] = [by_id[r].tags.get(TAG_FREEZE_VARIANT, VARIANT_PREFIX) for r in frame["run_id"]]
    return frame.sort_values(["freeze_blocks", "freeze_step"], kind="stable").reset_index(drop=True)


def tidy_layer_frame(run_id: str, step: Any, block: Any, metric: Any, value: Any) -> pd.DataFrame:
    """Canonical dtypes and order, so the artifact and history paths give equal frames.

    Duplicate (metric, block, step) rows - a resumed run may log a step twice - keep the last.
    """
    frame = pd.DataFrame(
        {
            "run_id": pd.Series([run_id] * len(step), dtype=str),
            "step": np.asarray(step, dtype=np.int64),
            "block": np.asarray(block, dtype=np.int64),
            "metric": pd.Series(list(metric), dtype=str),
            "value": np.asarray(value, dtype=np.float64),
        }
    )
    frame = frame.drop_duplicates(["metric", "block", "step"], keep="last")
    return frame.sort_values(["metric", "block", "step"], kind="stable").reset_index(drop=True)


def tidy_history_frame(run_id: str, step: Any, metric: Any, value: Any) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "run_id": pd.Series([run_id] * len(step), dtype=str),
            "step": np.asarray(step, dtype=np.int64),
            "metric": pd.Series(list(metric), dtype=str),
            "value": np.asarray(value, dtype=np.float64),
        }
    )
    frame = frame.drop_duplicates(["metric", "step"], keep="last")
    return frame.sort_values(["metric", "step"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- a run and its parts


@dataclass(frozen=True)
class Parts:
    """Which parts of a run :func:`analysis.io.load_run` reads besides its record.

    ``history``: run-level metric keys (a tuple), True for every ``train/*`` key, False for none.
    ``layers``: per-block metric names (a tuple), True for all, False for none. ``source``: the
    run the schedule was derived from (``layerlock.schedule_source``), read with its record,
    FLOP and time models (None when the run has no such tag or that run is gone).
    """

    history: bool | tuple[str, ...] = False
    layers: bool | tuple[str, ...] = False
    flop_model: bool = False
    time_model: bool = False
    schedule: bool = False
    source: bool = False


# What load_run reads when not told: everything of the run itself (not the schedule's source run).
WHOLE_RUN = Parts(history=True, layers=True, flop_model=True, time_model=True, schedule=True)


@dataclass(frozen=True)
class RunData:
    """A run's record and the parts of it that were read (:class:`Parts`), as plain values.

    Reading a part that was not loaded raises ``LayerLockError``: a missing FLOP model must not
    be mistaken for a run that has none. ``flop_model``, ``time_model`` and ``schedule`` are
    None when the run has no such artifact.
    """

    record: RunRecord
    parts: Mapping[str, Any] = field(default_factory=dict)

    def _part(self, name: str) -> Any:
        if name not in self.parts:
            raise LayerLockError(
                f"run {self.record.run_id}: its {name} was not loaded (analysis.io.load_run with Parts({name}=...))"
            )
        return self.parts[name]

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def history(self) -> pd.DataFrame:
        """Run-level history, tidy (``HISTORY_COLUMNS``)."""
        return self._part("history")

    @property
    def layers(self) -> pd.DataFrame:
        """Per-block metrics, tidy (``LAYER_COLUMNS``)."""
        return self._part("layers")

    @property
    def flop_model(self) -> dict[str, Any] | None:
        return self._part("flop_model")

    @property
    def time_model(self) -> dict[str, Any] | None:
        return self._part("time_model")

    @property
    def schedule(self) -> dict[str, Any] | None:
        return self._part("schedule")

    @property
    def source(self) -> RunData | None:
        """The run the schedule was derived from, with its FLOP and time models."""
        return self._part("source")


@dataclass(frozen=True)
class GroupSpec:
    """One compared group: a ``layerlock.group`` name and its runs, or one run on its own."""

    name: str
    kind: str  # "group" or "run"
    run_ids: tuple[str, ...]
    skipped: tuple[str, ...] = ()  # runs of the group left out because they did not finish


@dataclass(frozen=True)
class FreezeTestRuns:
    """A freeze-test baseline, its children (tagged ``layerlock.parent``) and the runs of its
    seed group (same ``layerlock.group`` tag, any status, the baseline among them): what the
    freeze-test grid, its calibrated tolerance and the agreement report are computed from."""

    baseline: RunData
    children: tuple[RunData, ...]
    seed_group: tuple[RunData, ...]
