"""Session state shared by the pages: the tracking URI and the run selection.

Two canonical keys carry across pages (plain keys, not widget keys, so Streamlit does not drop
them when a page's widgets disappear):

- ``tracking_uri``: where runs are read from (``$MLFLOW_TRACKING_URI``, else the embedded
  default, editable in the sidebar);
- ``selected_runs``: run ids in order; the first one is the "current" run of single-run pages.

Each page's picker widget has its own key; it is re-seeded from the canonical selection on
every render and writes back through ``on_change``, so a choice on one page shows on the next.
With nothing selected, pickers fall back to the most recent run(s). A page opened with
``?run=RUN_ID`` in its URL starts on that run (a link to one run's page).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import streamlit as st

from analysis import LayerLockError, first_line, io, schema
from app.views import loaders

URI_KEY = "tracking_uri"
SELECTED_KEY = "selected_runs"
URL_RUN_KEY = "run_from_url"  # the ?run= value already applied (later choices in the page win)
# A run whose method is freeze_test is one cell of a sweep, not something to browse first.
# Runs that are not training runs of their own: freeze-test cells, and study summaries.
CHILD_METHODS = (schema.METHOD_FREEZE_TEST, schema.METHOD_STUDY)


# More tracking URIs the operator offers in the sidebar (comma-separated), besides
# $MLFLOW_TRACKING_URI and the default; also `streamlit run app/Home.py -- --tracking-uri URI ...`.
URI_LIST_ENV = "LAYERLOCK_TRACKING_URIS"


def allowed_uris(argv: list[str] | None = None) -> list[str]:
    """The tracking URIs the sidebar offers, the resolved one first: ``$MLFLOW_TRACKING_URI`` (else
    the default), ``$LAYERLOCK_TRACKING_URIS``, ``--tracking-uri`` script arguments, the default.
    Nothing a visitor types reaches another http host (which would receive MLflow credentials
    from this server's environment) or another sqlite file."""
    argv = sys.argv[1:] if argv is None else argv
    out = [io.resolve_tracking_uri()]
    out += [u.strip() for u in os.environ.get(URI_LIST_ENV, "").split(",") if u.strip()]
    out += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--tracking-uri"]
    out += [a.split("=", 1)[1] for a in argv if a.startswith("--tracking-uri=")]
    out.append(io.DEFAULT_URI)
    return list(dict.fromkeys(out))


def tracking_uri() -> str:
    allowed = allowed_uris()
    if st.session_state.get(URI_KEY) not in allowed:
        st.session_state[URI_KEY] = allowed[0]
    return st.session_state[URI_KEY]


def set_tracking_uri(uri: str) -> bool:
    """Switch to ``uri`` if the operator configured it (see :func:`allowed_uris`); False otherwise."""
    if uri not in allowed_uris():
        return False
    if uri != st.session_state.get(URI_KEY):
        st.session_state[URI_KEY] = uri
        st.session_state[SELECTED_KEY] = []  # run ids of another store mean nothing here
    return True


def selected() -> list[str]:
    return list(st.session_state.get(SELECTED_KEY, []))


def set_selected(run_ids: list[str]) -> None:
    st.session_state[SELECTED_KEY] = list(dict.fromkeys(run_ids))


def promote(run_id: str | None) -> None:
    """Make ``run_id`` the current run (first of the selection), keeping the others."""
    if run_id:
        set_selected([run_id, *[r for r in selected() if r != run_id]])


@contextmanager
def notice_errors(kind: str = "warning") -> Iterator[None]:
    """Show a ``LayerLockError`` (bad run id, missing metric, unreadable store) as one message
    and stop the page; never a traceback."""
    try:
        yield
    except LayerLockError as err:
        (st.warning if kind == "warning" else st.info)(first_line(err))
        st.stop()


def load_runs() -> pd.DataFrame:
    """The store's runs, or an info message and a stopped page when there are none."""
    uri = tracking_uri()
    with notice_errors():
        frame = loaders.runs(uri)
    if frame.empty:
        st.info(
            f"No runs in the tracking store `{uri}` yet. Start one on the **Launch** page, or run "
            "`python -m experiments pretrain --config experiments/configs/mae_tiny.yaml` "
            "(or `python -m experiments demo`) and refresh."
        )
        st.stop()
    return frame


def browsable(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs to offer first: everything except freeze-test children."""
    keep = ~runs["method"].isin(CHILD_METHODS) & runs["parent"].isna()
    return runs[keep] if keep.any() else runs


def most_recent(runs: pd.DataFrame, n: int = 1) -> list[str]:
    """The newest finished browsable runs (any status when none finished), up to ``n``."""
    pool = browsable(runs)
    finished = pool[pool["status"] == "FINISHED"]
    pool = finished if not finished.empty else pool
    return list(pool["run_id"].head(n))


def recent_per_method(runs: pd.DataFrame, n: int = 3) -> list[str]:
    """Up to ``n`` recent finished runs, one per method first (MAE next to LayerLock)."""
    pool = browsable(runs)
    finished = pool[pool["status"] == "FINISHED"]
    pool = finished if not finished.empty else pool
    firsts = list(pool.drop_duplicates("method")["run_id"])
    rest = [r for r in pool["run_id"] if r not in firsts]
    return (firsts + rest)[:n]


def picker_labels(runs: pd.DataFrame) -> dict[str, str]:
    """run id -> ``name · method · status · id8`` for pickers."""
    out = {}
    for row in runs.itertuples(index=False):
        bits = [row.name or "(unnamed)", row.method or "?"]
        if row.status != "FINISHED":
            bits.append(row.status.lower())
        out[row.run_id] = " · ".join([*bits, row.run_id[:8]])
    return out


def run_from_url() -> None:
    """``?run=RUN_ID`` in the URL makes that run the current one, once per value (a later choice
    in the page wins); an id that is not in the store is ignored."""
    wanted = st.query_params.get("run")
    if not wanted or st.session_state.get(URL_RUN_KEY) == wanted:
        return
    st.session_state[URL_RUN_KEY] = wanted
    try:
        known = set(loaders.runs(tracking_uri())["run_id"])
    except LayerLockError:
        return
    if wanted in known:
        promote(wanted)


def _sync_single(key: str) -> None:
    promote(st.session_state.get(key))


def pick_run(
    runs: pd.DataFrame,
    key: str,
    label: str = "Run",
    options: list[str] | None = None,
    help: str | None = None,
    container=None,
) -> str | None:
    """A selectbox of runs seeded with the current run (else the most recent).

    Default options: the browsable runs, plus any selected run (e.g. a freeze-test child the user
    picked on the Runs page)."""
    if options is None:
        options = list(browsable(runs)["run_id"])
        options += [r for r in selected() if r in set(runs["run_id"]) and r not in options]
    options = list(options)
    if not options:
        return None
    labels = picker_labels(runs)
    current = next((r for r in selected() if r in options), None)
    if current is None:
        recent = most_recent(runs[runs["run_id"].isin(options)], 1)
        current = recent[0] if recent else options[0]
    st.session_state[key] = current
    where = container or st
    choice = where.selectbox(
        label, options, key=key, format_func=lambda r: labels.get(r, r), on_change=_sync_single, args=(key,), help=help
    )
    return choice


def _sync_multi(key: str) -> None:
    set_selected(list(st.session_state.get(key) or []))


def pick_runs(
    runs: pd.DataFrame,
    key: str,
    label: str = "Runs",
    default_n: int = 3,
    allow_empty: bool = False,
    help: str | None = None,
) -> list[str]:
    """A multiselect of runs seeded with the selection (else recent runs, one per method)."""
    options = list(runs["run_id"])
    labels = picker_labels(runs)
    current = [r for r in selected() if r in options]
    if not current and not allow_empty:
        current = recent_per_method(runs, default_n)
    st.session_state[key] = current
    return st.multiselect(
        label, options, key=key, format_func=lambda r: labels.get(r, r), on_change=_sync_multi, args=(key,), help=help
    )


def seed(key: str, options: list, default) -> None:
    """Give widget ``key`` a valid value before it is drawn: keep the user's choice while it is
    still an option, else ``default`` (options change with the run)."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = default if default in options else (options[0] if options else None)


JOBS_KEY = "launched_jobs"


def remember_job(job_id: str) -> None:
    """Jobs this session started, newest first (the launch page follows them)."""
    st.session_state[JOBS_KEY] = [job_id, *[j for j in st.session_state.get(JOBS_KEY, []) if j != job_id]]


def session_jobs() -> list[str]:
    return list(st.session_state.get(JOBS_KEY, []))
