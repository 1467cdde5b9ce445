"""The one module of ``analysis`` that talks to MLflow (``analysis.testing`` logs synthetic runs
for tests through its client; the trainer's side is ``core.tracking``: docs/architecture.md,
"Who talks to MLflow").

Everything else in ``analysis`` works on the plain values and tidy DataFrames returned here:

- layer metrics: ``run_id, step, block, metric, value`` (one row per logged per-block value),
- run-level history: ``run_id, step, metric, value``.

Reading conventions:

- The tracking URI is the explicit argument, else ``MLFLOW_TRACKING_URI``, else the embedded
  default ``sqlite:///mlflow.db`` (docs/architecture.md, "Run schema").
- Reads never create a store: a ``sqlite:///`` URI whose file does not exist is reported
  (``RunNotFoundError`` for a run, an empty frame for :func:`list_runs`) instead of letting
  MLflow create an empty database as a side effect of looking.
- MLflow errors become :class:`core.errors.LayerLockError` subclasses, so the command-line
  layer can print one line and exit 2.
- Nothing is cached here; the dashboard caches on its side.

``mlflow`` is imported lazily (inside functions) because importing it costs about a second and
pure callers such as ``python -m analysis --help`` should not pay for it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core import schema
from core.errors import LayerLockError, RunNotFoundError, first_line

# The run schema is part of this module's API (io.TAG_METHOD, io.block_key, ...): one definition, in core.
from core.schema import (  # noqa: F401
    BLOCK_METRICS,
    DERIVED_SCHEDULE_ARTIFACT,
    FLOP_MODEL_ARTIFACT,
    LAYER_METRICS_ARTIFACT,
    SCHEDULE_ARTIFACT,
    TAG_DATASET,
    TAG_FAILURE,
    TAG_FREEZE_BLOCKS,
    TAG_FREEZE_STEP,
    TAG_GROUP,
    TAG_METHOD,
    TAG_PARENT,
    TAG_SCHEDULE_SOURCE,
    TIME_MODEL_ARTIFACT,
    block_key,
)
from core.tracking import DEFAULT_URI, resolve_uri, sqlite_path  # noqa: F401  (DEFAULT_URI, sqlite_path: for the dashboard)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient


# One path component, then ``block_<digits>``: ``eval/digit/block_03/acc`` does not match.
_BLOCK_KEY = re.compile(r"^(?P<metric>[A-Za-z0-9_.-]+)/block_(?P<block>\d+)$")
# Final-probe evaluation keys ``eval/<task>/<metric>``; per-block probes have one more level.
_FINAL_EVAL_KEY = re.compile(r"^eval/[^/]+/[^/]+$")

LAYER_COLUMNS = ["run_id", "step", "block", "metric", "value"]
HISTORY_COLUMNS = ["run_id", "step", "metric", "value"]
RUN_COLUMNS = [
    "run_id", "experiment", "name", "status", "method", "dataset", "start_time", "end_time",
    "steps", "final_loss", "schedule_source", "parent", "failure_reason", "group", "seed",
]


def parse_block_key(key: str) -> tuple[str, int] | None:
    """Inverse of :func:`block_key`: ``"cka_final/block_03" -> ("cka_final", 3)``; None otherwise."""
    m = _BLOCK_KEY.match(key)
    return (m["metric"], int(m["block"])) if m else None


# ----------------------------------------------------------------------------- connection

def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` (as the trainer)."""
    return resolve_uri(uri)


def _store_missing(uri: str) -> bool:
    path = sqlite_path(uri)
    return path is not None and not path.exists()


def client(uri: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` bound to the resolved tracking URI.

    This may create the store (MLflow does that for a new sqlite file); the read helpers below
    check for a missing sqlite file first so that reading never does.
    """
    resolved = resolve_tracking_uri(uri)
    # Artifact downloads draw a tqdm bar on stderr; from a CLI or a dashboard server that is
    # noise. setdefault keeps a user's explicit choice.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from core.tracking import check_uri

    check_uri(resolved)   # an http(s) server that is not there fails in seconds, not minutes
    try:
        return MlflowClient(tracking_uri=resolved)
    except MlflowException as err:
        raise LayerLockError(f"cannot open tracking URI {resolved}: {first_line(err)}") from None


@contextmanager
def _mlflow_errors(uri: str, run_id: str | None = None) -> Iterator[None]:
    """Turn MLflow exceptions into LayerLockError (RunNotFoundError for unknown ids)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        code = getattr(err, "error_code", "")
        if run_id is not None and code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RunNotFoundError(f"run not found: {run_id} (tracking URI {uri})") from None
        raise LayerLockError(f"tracking store {uri}: {first_line(err)}") from None


def _open_for_run(run_id: str, uri: str | None) -> tuple[MlflowClient, str]:
    resolved = resolve_tracking_uri(uri)
    if not run_id:
        raise RunNotFoundError(f"run not found: (empty id) (tracking URI {resolved})")
    if _store_missing(resolved):
        # Say so without touching the store: MLflow would create an empty database.
        raise RunNotFoundError(f"run not found: {run_id} (tracking URI {resolved}: no such database file)")
    return client(resolved), resolved


def _fetch_run(run_id: str, uri: str | None) -> tuple[MlflowClient, str, Run]:
    c, resolved = _open_for_run(run_id, uri)
    with _mlflow_errors(resolved, run_id):
        run = c.get_run(run_id)
    return c, resolved, run


# ----------------------------------------------------------------------------- runs

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

    def param_int(self, key: str) -> int | None:
        """A param parsed as int (params are stored as strings), None if absent or not a number."""
        try:
            return int(float(self.params[key]))
        except (KeyError, ValueError, TypeError):
            return None


def _ms_to_timestamp(ms: int | None) -> pd.Timestamp | None:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def _record(run: Run, experiment_name: str) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        run_id=info.run_id,
        name=info.run_name or "",
        experiment=experiment_name,
        experiment_id=info.experiment_id,
        status=info.status,
        start_time=_ms_to_timestamp(info.start_time),
        end_time=_ms_to_timestamp(info.end_time),
        artifact_uri=info.artifact_uri,
        tags=dict(data.tags),
        params=dict(data.params),
        metrics=dict(data.metrics),
    )


def _experiment_name(c: MlflowClient, experiment_id: str, cache: dict[str, str] | None = None) -> str:
    if cache is not None and experiment_id in cache:
        return cache[experiment_id]
    from mlflow.exceptions import MlflowException

    try:
        name = c.get_experiment(experiment_id).name
    except MlflowException:  # a deleted or unreadable experiment should not hide the run
        name = str(experiment_id)
    if cache is not None:
        cache[experiment_id] = name
    return name


def get_run(run_id: str, uri: str | None = None) -> RunRecord:
    """Snapshot of one run. Unknown id -> ``RunNotFoundError``."""
    c, resolved, run = _fetch_run(run_id, uri)
    with _mlflow_errors(resolved):
        return _record(run, _experiment_name(c, run.info.experiment_id))


def load_params(run_id: str, uri: str | None = None) -> dict[str, str]:
    """Logged params (the flattened config, dotted keys, string values)."""
    return get_run(run_id, uri).params


def eval_metrics(metrics: dict[str, float], include_block_evals: bool = False) -> dict[str, float]:
    """The ``eval/<task>/<metric>`` entries of a metrics dict (plus per-block ones if asked)."""
    return {
        k: v for k, v in metrics.items()
        if k.startswith(schema.EVAL) and (include_block_evals or _FINAL_EVAL_KEY.match(k))
    }


def _runs_frame(records: Sequence[RunRecord], include_block_evals: bool = False) -> pd.DataFrame:
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


def _search_all(c: MlflowClient, experiment_ids: list[str], filter_string: str, max_results: int) -> list[Run]:
    """search_runs over several experiments, following page tokens up to ``max_results``."""
    runs: list[Run] = []
    token = None
    while experiment_ids and len(runs) < max_results:
        page = c.search_runs(
            experiment_ids, filter_string=filter_string, max_results=min(1000, max_results - len(runs)),
            order_by=["attributes.start_time DESC"], page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def list_runs(
    uri: str | None = None,
    experiment_names: Iterable[str] | None = None,
    max_results: int = 1000,
    include_block_evals: bool = False,
) -> pd.DataFrame:
    """All runs of the active experiments (or of ``experiment_names``), newest first.

    Columns: ``RUN_COLUMNS`` (``final_loss`` is the latest ``train/loss``; ``steps`` is the
    ``train.steps`` param; ``group`` the ``layerlock.group`` tag; ``seed`` the ``train.seed``
    param) followed by one column per final-probe metric ``eval/<task>/<metric>``
    (add the per-block ``eval/<task>/block_NN/<metric>`` with ``include_block_evals``).
    An empty or missing store gives an empty frame with ``RUN_COLUMNS``.
    """
    resolved = resolve_tracking_uri(uri)
    if _store_missing(resolved):
        return _runs_frame([])
    c = client(resolved)
    with _mlflow_errors(resolved):
        experiments = c.search_experiments()
        wanted = set(experiment_names) if experiment_names is not None else None
        names = {e.experiment_id: e.name for e in experiments if wanted is None or e.name in wanted}
        runs = _search_all(c, list(names), "", max_results)
    return _runs_frame([_record(r, names[r.info.experiment_id]) for r in runs], include_block_evals)


def find_children(parent_run_id: str, uri: str | None = None) -> pd.DataFrame:
    """Runs tagged ``layerlock.parent = parent_run_id`` (freeze-test children), in any experiment.

    Columns as :func:`list_runs` plus ``freeze_step`` (T) and ``freeze_blocks`` (L) from the
    ``layerlock.freeze_test.*`` tags (``<NA>`` where missing), sorted by L then T.
    """
    c, resolved, _ = _fetch_run(parent_run_id, uri)  # unknown parent -> RunNotFoundError
    if "'" in parent_run_id or "\\" in parent_run_id:
        return _children_frame([])  # cannot be a real run id; keeps the filter string well-formed
    with _mlflow_errors(resolved):
        experiment_ids = [e.experiment_id for e in c.search_experiments()]
        runs = _search_all(c, experiment_ids, f"tags.`{TAG_PARENT}` = '{parent_run_id}'", 10_000)
        cache: dict[str, str] = {}
        records = [_record(r, _experiment_name(c, r.info.experiment_id, cache)) for r in runs]
    return _children_frame(records)


def runs_with_tag(key: str, value: str, uri: str | None = None) -> list[RunRecord]:
    """Runs of any experiment and status whose tag ``key`` equals ``value``, newest first."""
    resolved = resolve_tracking_uri(uri)
    if _store_missing(resolved) or "'" in value or "\\" in value:
        return []  # no store, or a value that cannot be a tag we wrote (keeps the filter well-formed)
    c = client(resolved)
    with _mlflow_errors(resolved):
        experiment_ids = [e.experiment_id for e in c.search_experiments()]
        runs = _search_all(c, experiment_ids, f"tags.`{key}` = '{value}'", 10_000)
        cache: dict[str, str] = {}
        return [_record(r, _experiment_name(c, r.info.experiment_id, cache)) for r in runs]


def delete_run(run_id: str, uri: str | None = None) -> None:
    """Move a run to MLflow's trash (searches no longer see it; ``mlflow gc`` removes it for good):
    an attempt the executor replaces, so the store holds each run of a set once."""
    c, resolved = _open_for_run(run_id, uri)
    with _mlflow_errors(resolved, run_id):
        c.delete_run(run_id)


def runs_in_group(group: str, uri: str | None = None) -> pd.DataFrame:
    """Runs tagged ``layerlock.group = group`` (seeds of one config), in any experiment.

    Columns as :func:`list_runs`, sorted by ``seed`` then start time. An unknown group, or a
    missing store, gives an empty frame (the caller decides whether that is an error).
    """
    frame = _runs_frame(runs_with_tag(TAG_GROUP, group, uri) if group else [])
    return frame.sort_values(["seed", "start_time"], kind="stable", na_position="last").reset_index(drop=True)


def _children_frame(records: Sequence[RunRecord]) -> pd.DataFrame:
    frame = _runs_frame(records)
    by_id = {r.run_id: r for r in records}

    def tag_int(run_id: str, key: str) -> int | None:
        try:
            return int(by_id[run_id].tags[key])
        except (KeyError, ValueError):
            return None

    frame["freeze_step"] = pd.array([tag_int(r, TAG_FREEZE_STEP) for r in frame["run_id"]], dtype="Int64")
    frame["freeze_blocks"] = pd.array([tag_int(r, TAG_FREEZE_BLOCKS) for r in frame["run_id"]], dtype="Int64")
    return frame.sort_values(["freeze_blocks", "freeze_step"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- metric frames

def _empty_layer_frame() -> pd.DataFrame:
    return _tidy_layer_frame("", [], [], [], [])


def _tidy_layer_frame(run_id: str, step: Any, block: Any, metric: Any, value: Any) -> pd.DataFrame:
    """Canonical dtypes and order, so the artifact and history paths give equal frames.

    Duplicate (metric, block, step) rows - a resumed run may log a step twice - keep the last.
    """
    frame = pd.DataFrame({
        "run_id": pd.Series([run_id] * len(step), dtype=str),
        "step": np.asarray(step, dtype=np.int64),
        "block": np.asarray(block, dtype=np.int64),
        "metric": pd.Series(list(metric), dtype=str),
        "value": np.asarray(value, dtype=np.float64),
    })
    frame = frame.drop_duplicates(["metric", "block", "step"], keep="last")
    return frame.sort_values(["metric", "block", "step"], kind="stable").reset_index(drop=True)


def _tidy_history_frame(run_id: str, step: Any, metric: Any, value: Any) -> pd.DataFrame:
    frame = pd.DataFrame({
        "run_id": pd.Series([run_id] * len(step), dtype=str),
        "step": np.asarray(step, dtype=np.int64),
        "metric": pd.Series(list(metric), dtype=str),
        "value": np.asarray(value, dtype=np.float64),
    })
    frame = frame.drop_duplicates(["metric", "step"], keep="last")
    return frame.sort_values(["metric", "step"], kind="stable").reset_index(drop=True)


def _histories(c: MlflowClient, run_id: str, keys: Iterable[str]) -> Iterator[tuple[str, list[Any]]]:
    # One query per key; on sqlite that is a few milliseconds each (12 blocks x 7 metrics
    # stays well under a second). Entries come back in logging order, so "keep last" in the
    # tidy builders keeps the value logged last for a repeated step.
    for key in keys:
        yield key, sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def _artifact_names(c: MlflowClient, run_id: str) -> set[str]:
    from mlflow.exceptions import MlflowException

    try:
        return {f.path for f in c.list_artifacts(run_id)}
    except (MlflowException, OSError):  # an unreachable artifact store reads as "no artifacts"
        return set()


def _download(c: MlflowClient, run_id: str, path: str, dst: str) -> Path:
    return Path(c.download_artifacts(run_id, path, dst))


def load_layer_metrics(
    run_id: str,
    uri: str | None = None,
    metrics: Iterable[str] | None = None,
    source: str = "auto",
) -> pd.DataFrame:
    """Per-block metrics of a run, tidy: ``run_id, step, block, metric, value``.

    ``source="auto"`` reads the ``layer_metrics.parquet`` artifact when the run has one (one
    file read, fast for 12 blocks x 5000 steps) and otherwise the metric history of the
    ``<metric>/block_NN`` keys (a run still training has no artifact yet). ``"artifact"`` and
    ``"history"`` force one path. ``metrics`` restricts the metric names.
    Rows are sorted by metric, block, step. No per-block metrics -> an empty frame.
    """
    if source not in ("auto", "artifact", "history"):
        raise ValueError(f"source must be auto, artifact or history, not {source!r}")
    c, resolved, run = _fetch_run(run_id, uri)
    wanted = set(metrics) if metrics is not None else None
    with _mlflow_errors(resolved):
        if source != "history" and LAYER_METRICS_ARTIFACT in _artifact_names(c, run_id):
            frame = _layer_frame_from_artifact(c, run_id)
            return frame if wanted is None else frame[frame["metric"].isin(wanted)].reset_index(drop=True)
        if source == "artifact":
            raise LayerLockError(f"run {run_id} has no {LAYER_METRICS_ARTIFACT} artifact")
        keys = []
        for key in run.data.metrics:
            m = _BLOCK_KEY.match(key)
            if m and (wanted is None or m["metric"] in wanted):
                keys.append((key, m["metric"], int(m["block"])))
        steps: list[int] = []
        blocks: list[int] = []
        names: list[str] = []
        values: list[float] = []
        hist = dict(_histories(c, run_id, [k for k, _, _ in keys]))
        for key, name, block in keys:
            for entry in hist[key]:
                steps.append(entry.step)
                blocks.append(block)
                names.append(name)
                values.append(entry.value)
    return _tidy_layer_frame(run_id, steps, blocks, names, values)


def _layer_frame_from_artifact(c: MlflowClient, run_id: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory(prefix="layerlock-") as tmp:
        path = _download(c, run_id, LAYER_METRICS_ARTIFACT, tmp)
        try:
            raw = pd.read_parquet(path)
        except (OSError, ValueError) as err:  # pyarrow's errors derive from these
            raise LayerLockError(f"run {run_id}: cannot read {LAYER_METRICS_ARTIFACT}: {first_line(err)}") from None
    missing = [col for col in ("step", "block", "metric", "value") if col not in raw.columns]
    if missing:
        raise LayerLockError(f"run {run_id}: {LAYER_METRICS_ARTIFACT} lacks column(s) {', '.join(missing)}")
    return _tidy_layer_frame(run_id, raw["step"], raw["block"], raw["metric"].astype(str), raw["value"])


def load_history(run_id: str, keys: Iterable[str] | None = None, uri: str | None = None) -> pd.DataFrame:
    """Run-level metric history, tidy: ``run_id, step, metric, value`` sorted by metric, step.

    ``keys=None`` reads every logged ``train/*`` key; keys the run never logged are skipped.
    """
    c, resolved, run = _fetch_run(run_id, uri)
    logged = run.data.metrics
    if keys is None:
        wanted = [k for k in logged if k.startswith(schema.TRAIN)]
    else:
        wanted = [k for k in dict.fromkeys(keys) if k in logged]
    steps: list[int] = []
    names: list[str] = []
    values: list[float] = []
    with _mlflow_errors(resolved):
        for key, entries in _histories(c, run_id, wanted):
            for entry in entries:
                steps.append(entry.step)
                names.append(key)
                values.append(entry.value)
    return _tidy_history_frame(run_id, steps, names, values)


# ----------------------------------------------------------------------------- artifacts

def load_text_artifact(run_id: str, path: str, uri: str | None = None) -> str | None:
    """A text artifact's content, or None when the run does not have it."""
    c, resolved, _ = _fetch_run(run_id, uri)
    with _mlflow_errors(resolved):
        parent = str(Path(path).parent)
        listed = {f.path for f in c.list_artifacts(run_id, None if parent == "." else parent)}
        if path not in listed:
            return None
        with tempfile.TemporaryDirectory(prefix="layerlock-") as tmp:
            return _download(c, run_id, path, tmp).read_text()


def load_json_artifact(run_id: str, path: str, uri: str | None = None) -> Any | None:
    """A JSON artifact parsed, or None when the run does not have it."""
    text = load_text_artifact(run_id, path, uri)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise LayerLockError(f"run {run_id}: artifact {path} is not valid JSON ({err.msg})") from None


def load_flop_model(run_id: str, uri: str | None = None) -> dict[str, Any] | None:
    """``flop_model.json``: counted FLOPs of one step per frozen-prefix length, or None."""
    return load_json_artifact(run_id, FLOP_MODEL_ARTIFACT, uri)


def load_time_model(run_id: str, uri: str | None = None) -> dict[str, Any] | None:
    """``time_model.json``: measured step time per frozen-prefix length (``core.timemodel``), or None."""
    return load_json_artifact(run_id, TIME_MODEL_ARTIFACT, uri)


def load_schedule(run_id: str, uri: str | None = None, artifact_file: str = SCHEDULE_ARTIFACT) -> dict[str, Any] | None:
    """The schedule the run trained with (``schedule.json``), or None (e.g. an MAE run).

    Pass ``artifact_file=DERIVED_SCHEDULE_ARTIFACT`` for one saved by :func:`log_schedule_artifact`.
    """
    return load_json_artifact(run_id, artifact_file, uri)


def log_schedule_artifact(
    run_id: str,
    schedule: dict[str, Any],
    uri: str | None = None,
    artifact_file: str = DERIVED_SCHEDULE_ARTIFACT,
) -> str:
    """Validate ``schedule`` and store it as a JSON artifact of the run; returns its artifact URI."""
    # A pure module; imported here so that importing io does not pull in the schedule code.
    from analysis.schedule import validate_schedule

    validate_schedule(schedule)
    c, resolved, run = _fetch_run(run_id, uri)
    with _mlflow_errors(resolved):
        c.log_dict(run_id, schedule, artifact_file)
    return f"{run.info.artifact_uri.rstrip('/')}/{artifact_file}"
