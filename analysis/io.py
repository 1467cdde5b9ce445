"""The store module: the one module of ``analysis`` that talks to MLflow (docs/architecture.md,
"Who talks to MLflow"; the trainer's side is ``core.tracking``). It owns every tracking URI.

It returns plain values (:mod:`analysis.records`): a run's snapshot (:func:`get_run`), a run
with the parts an analysis needs (:func:`load_run`: history, layer metrics, FLOP and time
models, schedule, the run its schedule was derived from), groups of seeds
(:func:`resolve_groups`), a freeze test's runs (:func:`load_freeze_test`), run tables and tidy
frames. Every other analysis module is pure functions of those.

Reading conventions:

- The tracking URI is the explicit argument, else ``MLFLOW_TRACKING_URI``, else the embedded
  default ``sqlite:///mlflow.db`` (docs/architecture.md, "Run schema").
- Reads never create a store: a ``sqlite:///`` URI whose file does not exist is reported
  (``RunNotFoundError`` for a run, an empty frame for :func:`list_runs`) instead of letting
  MLflow create an empty database as a side effect of looking.
- MLflow errors become :class:`core.errors.LayerLockError` subclasses, so the command-line
  layer can print one line and exit 2.
- Nothing is cached here; the dashboard caches on its side.

``mlflow`` is imported lazily (inside functions): importing it is slow, and pure callers such as
``python -m analysis --help`` should not pay for it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from analysis.records import (
    WHOLE_RUN,
    FreezeTestRuns,
    GroupSpec,
    Parts,
    RunData,
    RunRecord,
    children_frame,
    parse_block_key,
    runs_frame,
    tidy_history_frame,
    tidy_layer_frame,
)
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

    check_uri(resolved)  # an http(s) server that is not there fails in seconds, not minutes
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
        return RunRecord.from_mlflow(run, _experiment_name(c, run.info.experiment_id))


def _search_all(c: MlflowClient, experiment_ids: list[str], filter_string: str, max_results: int) -> list[Run]:
    """search_runs over several experiments, following page tokens up to ``max_results``."""
    runs: list[Run] = []
    token = None
    while experiment_ids and len(runs) < max_results:
        page = c.search_runs(
            experiment_ids,
            filter_string=filter_string,
            max_results=min(1000, max_results - len(runs)),
            order_by=["attributes.start_time DESC"],
            page_token=token,
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
        return runs_frame([])
    c = client(resolved)
    with _mlflow_errors(resolved):
        experiments = c.search_experiments()
        wanted = set(experiment_names) if experiment_names is not None else None
        names = {e.experiment_id: e.name for e in experiments if wanted is None or e.name in wanted}
        runs = _search_all(c, list(names), "", max_results)
    return runs_frame([RunRecord.from_mlflow(r, names[r.info.experiment_id]) for r in runs], include_block_evals)


def find_children(parent_run_id: str, uri: str | None = None) -> pd.DataFrame:
    """Runs tagged ``layerlock.parent = parent_run_id`` (freeze-test children), in any experiment.

    Columns as :func:`list_runs` plus ``freeze_step`` (T) and ``freeze_blocks`` (L) from the
    ``layerlock.freeze_test.*`` tags (``<NA>`` where missing), sorted by L then T.
    """
    return children_frame(_child_records(parent_run_id, uri))


def _child_records(parent_run_id: str, uri: str | None) -> list[RunRecord]:
    c, resolved, _ = _fetch_run(parent_run_id, uri)  # unknown parent -> RunNotFoundError
    if "'" in parent_run_id or "\\" in parent_run_id:
        return []  # cannot be a real run id; keeps the filter string well-formed
    with _mlflow_errors(resolved):
        experiment_ids = [e.experiment_id for e in c.search_experiments()]
        runs = _search_all(c, experiment_ids, f"tags.`{TAG_PARENT}` = '{parent_run_id}'", 10_000)
        cache: dict[str, str] = {}
        return [RunRecord.from_mlflow(r, _experiment_name(c, r.info.experiment_id, cache)) for r in runs]


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
        return [RunRecord.from_mlflow(r, _experiment_name(c, r.info.experiment_id, cache)) for r in runs]


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
    frame = runs_frame(runs_with_tag(TAG_GROUP, group, uri) if group else [])
    return frame.sort_values(["seed", "start_time"], kind="stable", na_position="last").reset_index(drop=True)


# ----------------------------------------------------------------------------- metric frames


def _histories(c: MlflowClient, run_id: str, keys: Iterable[str]) -> Iterator[tuple[str, list[Any]]]:
    # One query per key (a run still training has no layer_metrics.parquet to read at once).
    # Entries come back in logging order, so "keep last" in the tidy builders keeps the value
    # logged last for a repeated step.
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
    file read, however many blocks and steps) and otherwise the metric history of the
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
            return _layer_frame_from_artifact(c, run_id, wanted)
        if source == "artifact":
            raise LayerLockError(f"run {run_id} has no {LAYER_METRICS_ARTIFACT} artifact")
        keys = []
        for key in run.data.metrics:
            parsed = parse_block_key(key)
            if parsed and (wanted is None or parsed[0] in wanted):
                keys.append((key, *parsed))
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
    return tidy_layer_frame(run_id, steps, blocks, names, values)


def _layer_frame_from_artifact(c: MlflowClient, run_id: str, wanted: set[str] | None = None) -> pd.DataFrame:
    """The artifact's rows (only the ``wanted`` metrics: picked before the tidy frame is built,
    the costly part on a long run) as a tidy frame."""
    with tempfile.TemporaryDirectory(prefix="layerlock-") as tmp:
        path = _download(c, run_id, LAYER_METRICS_ARTIFACT, tmp)
        try:
            raw = pd.read_parquet(path)
        except (OSError, ValueError) as err:  # pyarrow's errors derive from these
            raise LayerLockError(f"run {run_id}: cannot read {LAYER_METRICS_ARTIFACT}: {first_line(err)}") from None
    missing = [col for col in ("step", "block", "metric", "value") if col not in raw.columns]
    if missing:
        raise LayerLockError(f"run {run_id}: {LAYER_METRICS_ARTIFACT} lacks column(s) {', '.join(missing)}")
    if wanted is not None:
        raw = raw[raw["metric"].astype(str).isin(wanted)]
    return tidy_layer_frame(run_id, raw["step"], raw["block"], raw["metric"].astype(str), raw["value"])


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
    return tidy_history_frame(run_id, steps, names, values)


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
    from core.freezing import validate_schedule

    validate_schedule(schedule)
    c, resolved, run = _fetch_run(run_id, uri)
    with _mlflow_errors(resolved):
        c.log_dict(run_id, schedule, artifact_file)
    return f"{run.info.artifact_uri.rstrip('/')}/{artifact_file}"


# ----------------------------------------------------------------------------- a run with its parts


def load_run(run_id: str, uri: str | None = None, parts: Parts = WHOLE_RUN) -> RunData:
    """A run's record and the ``parts`` of it an analysis reads (:class:`analysis.records.Parts`;
    default: everything of the run itself). Unknown id -> ``RunNotFoundError``."""
    return _with_parts(get_run(run_id, uri), uri, parts)


def load_runs(run_ids: Iterable[str], uri: str | None = None, parts: Parts = WHOLE_RUN) -> dict[str, RunData]:
    """:func:`load_run` for each id, in order (an id given twice is read once)."""
    return {run_id: load_run(run_id, uri, parts) for run_id in dict.fromkeys(run_ids)}


def _with_parts(record: RunRecord, uri: str | None, parts: Parts) -> RunData:
    run_id, read = record.run_id, {}
    if parts.history is not False:
        read["history"] = load_history(run_id, None if parts.history is True else parts.history, uri)
    if parts.layers is not False:
        read["layers"] = load_layer_metrics(run_id, uri, metrics=None if parts.layers is True else parts.layers)
    if parts.flop_model:
        read["flop_model"] = load_flop_model(run_id, uri)
    if parts.time_model:
        read["time_model"] = load_time_model(run_id, uri)
    if parts.schedule:
        read["schedule"] = load_schedule(run_id, uri)
    if parts.source:
        read["source"] = _schedule_source(record, uri)
    return RunData(record, read)


def _schedule_source(record: RunRecord, uri: str | None) -> RunData | None:
    """The run ``record``'s schedule was derived from, with its FLOP and time models (None when
    the run has no ``layerlock.schedule_source`` tag or that run is no longer in the store)."""
    source_id = record.tags.get(TAG_SCHEDULE_SOURCE)
    if not source_id:
        return None
    try:
        return load_run(source_id, uri, Parts(flop_model=True, time_model=True))
    except RunNotFoundError:
        return None


def resolve_groups(names: Sequence[str], uri: str | None = None) -> list[GroupSpec]:
    """Each name is a ``layerlock.group`` tag value (expanded to its FINISHED runs, by seed) or a
    run id (a group of one, whatever its status). Neither -> ``RunNotFoundError``."""
    specs: list[GroupSpec] = []
    for name in dict.fromkeys(names):  # a name given twice is compared once
        members = runs_in_group(name, uri)
        if not members.empty:
            done = members["status"] == "FINISHED"
            if not done.any():
                raise LayerLockError(f"group {name} has no finished run yet ({len(members)} run(s) in it)")
            specs.append(
                GroupSpec(name, "group", tuple(members.loc[done, "run_id"]), tuple(members.loc[~done, "run_id"]))
            )
            continue
        try:
            get_run(name, uri)
        except RunNotFoundError:
            raise RunNotFoundError(
                f"not a run id or a {TAG_GROUP} name: {name} (tracking URI {resolve_tracking_uri(uri)})"
            ) from None
        specs.append(GroupSpec(name, "run", (name,)))
    return specs


def load_group_layer_metrics(
    group: str, uri: str | None = None, metrics: Iterable[str] | None = None
) -> dict[str, pd.DataFrame]:
    """run id -> tidy per-block metrics (:func:`load_layer_metrics`) of each run ``group`` names
    (:func:`resolve_groups`: a group's FINISHED runs by seed, or one run id), for
    :func:`analysis.convergence.group_convergence`."""
    wanted = tuple(metrics) if metrics is not None else None
    (spec,) = resolve_groups([group], uri)
    return {run_id: load_layer_metrics(run_id, uri, metrics=wanted) for run_id in spec.run_ids}


def load_freeze_test(
    baseline_id: str, uri: str | None = None, parts: Parts = WHOLE_RUN, baseline_parts: Parts | None = None
) -> FreezeTestRuns:
    """A freeze-test baseline (read with ``baseline_parts``, default ``parts``), its children
    (tagged ``layerlock.parent``) and the runs of its seed group (its ``layerlock.group`` tag;
    the baseline's entry is the baseline itself), each read with ``parts``."""
    baseline = load_run(baseline_id, uri, baseline_parts or parts)
    children = tuple(_with_parts(r, uri, parts) for r in _child_records(baseline_id, uri))
    group = baseline.record.tags.get(TAG_GROUP)
    members = runs_with_tag(TAG_GROUP, group, uri) if group else []
    seed_group = tuple(baseline if r.run_id == baseline_id else _with_parts(r, uri, parts) for r in members)
    return FreezeTestRuns(baseline, children, seed_group)


def load_checkpoint(run_id: str, uri: str | None = None, step: int | None = None) -> dict:
    """A run's checkpoint, the latest or at ``step`` (``core.train.load_run_checkpoint``: core
    reads the artifacts it writes, local copy first)."""
    from core.train import load_run_checkpoint

    return load_run_checkpoint(run_id, step=step, tracking_uri=uri)
