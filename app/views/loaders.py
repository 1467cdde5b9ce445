"""Cached data loading for the pages: ``st.cache_data`` around ``analysis.io``.

Cache keys: ``(uri, run_id, version, ...)``. ``version`` (:func:`run_version`) is the run's
status plus its end time for a run that ended -- so a finished run is read from the store once
-- and, for a run still training, a digest of its latest metric values, which changes whenever
the trainer logs, so a live run refreshes exactly when there is something new to show.

The run list and single-run snapshots (which the version comes from) are cached for a few
seconds only (``ttl``). Loaders raise ``core.errors.LayerLockError``; pages turn that into a
message (:func:`app.views.state.notice_errors`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import pandas as pd
import streamlit as st

from analysis import io, schema
from analysis.records import FreezeTestRuns, RunRecord, parse_block_key

TERMINAL = ("FINISHED", "FAILED", "KILLED")
RUNS_TTL_S = 5
RECORD_TTL_S = 2


@st.cache_data(ttl=RUNS_TTL_S, show_spinner=False, max_entries=8)
def runs(uri: str) -> pd.DataFrame:
    """All runs of the store, newest first (``io.list_runs``)."""
    return io.list_runs(uri)


@st.cache_data(ttl=RUNS_TTL_S, show_spinner=False, max_entries=64)
def job_run(uri: str, job_id: str) -> str | None:
    """The run a Launch-page job started (tagged with its job id), once it is in the store."""
    found = io.runs_with_tag(schema.TAG_JOB, job_id, uri)
    return found[0].run_id if found else None


@st.cache_data(ttl=RECORD_TTL_S, show_spinner=False, max_entries=256)
def record(uri: str, run_id: str) -> RunRecord:
    return io.get_run(run_id, uri)


def version_of(rec: RunRecord) -> str:
    if rec.status in TERMINAL:
        return f"{rec.status}:{rec.end_time}"
    digest = hashlib.blake2b(repr(sorted(rec.metrics.items())).encode(), digest_size=8).hexdigest()
    return f"{rec.status}:{digest}"


def row_version(status: str, end_time: Any) -> str:
    """Cache version from a run-list row: enough for a run that ended (it never changes again)."""
    return f"{status}:{end_time}"


def run_version(uri: str, run_id: str) -> tuple[RunRecord, str]:
    """The run's snapshot and its cache version."""
    rec = record(uri, run_id)
    return rec, version_of(rec)


@st.cache_data(show_spinner=False, max_entries=64)
def layer_metrics(uri: str, run_id: str, version: str, metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Tidy per-block metrics (``io.load_layer_metrics``), optionally only ``metrics``."""
    return io.load_layer_metrics(run_id, uri, metrics=metrics)


@st.cache_data(show_spinner=False, max_entries=128)
def metric_wide(uri: str, run_id: str, version: str, metric: str) -> pd.DataFrame:
    """One per-block metric as a step x block table; an empty frame when the run lacks it."""
    from analysis.convergence import metric_wide as wide

    frame = layer_metrics(uri, run_id, version, (metric,))
    if frame.empty:
        return pd.DataFrame()
    return wide(frame, metric)


@st.cache_data(show_spinner=False, max_entries=64)
def block_metric_names(uri: str, run_id: str, version: str) -> list[str]:
    """Per-block metric names the run logged (from its latest metrics, no history read)."""
    names = set()
    for key in record(uri, run_id).metrics:
        parsed = parse_block_key(key)
        if parsed:
            names.add(parsed[0])
    if not names:  # an artifact-only run (no per-block history keys)
        names = set(layer_metrics(uri, run_id, version)["metric"].unique())
    order = list(io.BLOCK_METRICS)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


@st.cache_data(show_spinner=False, max_entries=128)
def convergence(uri: str, run_id: str, version: str, method: str, threshold: float, patience: int | None) -> pd.Series:
    from analysis.convergence import RULES, detect_convergence

    frame = layer_metrics(uri, run_id, version, (RULES[method]["metric"],))
    return detect_convergence(frame, method, threshold, patience)


@st.cache_data(show_spinner=False, max_entries=16)
def group_wide(uri: str, run_ids: tuple[str, ...], versions: tuple[str, ...], metric: str) -> dict[str, Any]:
    """A group's per-block metric over its runs on their common steps
    (``analysis.convergence.mean_over_runs`` of each run's cached :func:`metric_wide`)."""
    from analysis.convergence import mean_over_runs

    return mean_over_runs({r: metric_wide(uri, r, v, metric) for r, v in zip(run_ids, versions, strict=True)})


@st.cache_data(show_spinner=False, max_entries=32)
def group_convergence(
    uri: str, run_ids: tuple[str, ...], versions: tuple[str, ...], method: str, threshold: float, patience: int | None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Each block's convergence step over the group's runs and the depth order over seeds
    (``group_steps`` and ``group_order`` of each run's cached :func:`convergence`; run id columns)."""
    from analysis.convergence import group_order, group_steps

    convs = {r: convergence(uri, r, v, method, threshold, patience) for r, v in zip(run_ids, versions, strict=True)}
    return group_steps(convs), group_order(convs)


@st.cache_data(show_spinner=False, max_entries=128)
def history(uri: str, run_id: str, version: str, keys: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Run-level history (``io.load_history``)."""
    return io.load_history(run_id, keys, uri)


@st.cache_data(show_spinner=False, max_entries=128)
def flop_model(uri: str, run_id: str, version: str) -> dict[str, Any] | None:
    return io.load_flop_model(run_id, uri)


@st.cache_data(show_spinner=False, max_entries=128)
def time_model(uri: str, run_id: str, version: str) -> dict[str, Any] | None:
    return io.load_time_model(run_id, uri)


@st.cache_data(show_spinner=False, max_entries=128)
def schedule(uri: str, run_id: str, version: str, artifact_file: str = io.SCHEDULE_ARTIFACT) -> dict | None:
    return io.load_schedule(run_id, uri, artifact_file)


@st.cache_data(show_spinner=False, max_entries=256)
def compute_saving(uri: str, run_id: str, version: str) -> float | None:
    """Counted FLOPs saved against the same run with nothing frozen (``analysis.flops.logged_saving``)."""
    from analysis.flops import logged_saving

    rec = record(uri, run_id)
    total, steps = rec.metrics.get(schema.FLOPS), rec.param_int("train.steps")
    if total is None or not steps or rec.status != "FINISHED":
        return None  # decided before reading the flop model artifact
    return logged_saving(total, steps, io.load_flop_model(run_id, uri))


@st.cache_data(show_spinner=False, max_entries=16)
def study_report(uri: str, run_id: str, version: str) -> tuple[str | None, dict | None]:
    """A study run's ``study/report.md`` text and ``study/results.json`` (None where missing)."""
    return (
        io.load_text_artifact(run_id, f"{schema.STUDY_DIR}/report.md", uri),
        io.load_json_artifact(run_id, f"{schema.STUDY_DIR}/results.json", uri),
    )


@st.cache_data(ttl=RUNS_TTL_S, show_spinner=False, max_entries=32)
def children(uri: str, parent_id: str) -> pd.DataFrame:
    return io.find_children(parent_id, uri)


@st.cache_data(ttl=RUNS_TTL_S, show_spinner=False, max_entries=32)
def freeze_test(uri: str, parent_id: str) -> FreezeTestRuns:
    """A freeze test's runs (``io.load_freeze_test``), read once for the grid, its tolerance and
    the agreement report: every run's final loss, the baseline's per-block metrics too."""
    from analysis.agreement import AGREEMENT_BASELINE_PARTS
    from analysis.compare import FINAL_LOSS_PARTS

    return io.load_freeze_test(parent_id, uri, FINAL_LOSS_PARTS, baseline_parts=AGREEMENT_BASELINE_PARTS)


@st.cache_data(ttl=RUNS_TTL_S, show_spinner=False, max_entries=32)
def freeze_grid(uri: str, parent_id: str, tol: float, variant: str = schema.VARIANT_PREFIX):
    """The grid of one freeze-test variant at ``tol``, scored as the commands score it: against the
    seed group's mean when the baseline has one (``analysis.agreement.freeze_grid``)."""
    from analysis.agreement import freeze_grid as scored_grid

    return scored_grid(freeze_test(uri, parent_id), tol=tol, variant=variant)[0]


@st.cache_data(ttl=RUNS_TTL_S, show_spinner=False, max_entries=32)
def freeze_tolerance(uri: str, parent_id: str):
    """The freeze test's calibrated tolerance (``analysis.agreement.calibrated_tolerance``)."""
    from analysis.agreement import calibrated_tolerance

    return calibrated_tolerance(freeze_test(uri, parent_id))


@st.cache_data(ttl=RUNS_TTL_S, show_spinner=False, max_entries=32)
def agreement(uri: str, parent_id: str, tol: float) -> dict[str, Any]:
    """Cheap rules against the freeze test at ``tol`` (``analysis.agreement.agreement_report``)."""
    from analysis.agreement import agreement_report

    return agreement_report(freeze_test(uri, parent_id), tol=tol)


def refresh_live() -> None:
    """Forget the short-lived caches (run list, snapshots): a user asked for fresh data."""
    runs.clear()
    job_run.clear()
    record.clear()
    children.clear()
    freeze_test.clear()
    freeze_grid.clear()
    freeze_tolerance.clear()
    agreement.clear()
