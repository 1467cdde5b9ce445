"""Session state shared by the pages: the tracking URI and the run selection.

Two canonical keys carry across pages (plain keys, not widget keys, so Streamlit does not drop
them when a page's widgets disappear):

- ``tracking_uri``: where runs are read from (``$MLFLOW_TRACKING_URI``, else the embedded
  default, editable in the sidebar);
- ``selected_runs``: run ids in order; the first one is the "current" run of single-run pages.

Each page's picker widget has its own key; it is re-seeded from the canonical selection on
every render and writes back through ``on_change``, so a choice on one page shows on the next.
With nothing selected, pickers fall back to the *opening*: after a demo or a study (its runs are
the newest), its MAE baseline on single-run pages and its MAE against LayerLock and the ablations
on Compare (groups of seeds where it has seeds); otherwise the most recent run(s). A page opened
with ``?run=RUN_ID`` in its URL starts on that run (a link to one run's page); ``?demo=ID`` or
``?study=ID`` opens on that demo's or study's runs, ``?runs=ID,ID`` selects runs (every id is
checked against the store's; nothing else from a URL is used).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import streamlit as st

from analysis import LayerLockError, first_line, io, schema
from app.views import loaders

URI_KEY = "tracking_uri"
SELECTED_KEY = "selected_runs"
SELECTED_GROUPS_KEY = "selected_groups"  # the group selection (app.views.groups)
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


# ----------------------------------------------------------------------------- demos and studies

# `experiments demo` and `experiments study` tag each run's layerlock.group as "<id>-<role>": the
# id is "demo-YYYYmmdd-HHMMSS" (a study: its --out folder's name, by default "study-..."; its
# summary run is named after it) and the role is the run's name there.
ROLES = ("mae", "layerlock", "latent_scheduled", "latent_naive", "freeze_only")  # MAE, LayerLock, the ablations
_BUNDLE_GROUP = re.compile(r"^(?P<id>.+)-(?P<role>" + "|".join(ROLES) + r")$")
_DEMO_ID = re.compile(r"^demo-\d{8}-\d{6}$")
_STUDY_ID = re.compile(r"^study-\d{8}-\d{6}$")
OPENING_KEY = "opening_bundle"  # a ?demo= / ?study= id already applied
URL_BUNDLE_KEY = "bundle_from_url"


@dataclass(frozen=True)
class Bundle:
    """The runs of one demo or study: ``runs[role]`` in seed order, ``groups[role]`` its group tag."""

    kind: str  # "demo" or "study"
    id: str
    runs: dict[str, list[str]] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    newest: object = None  # start time of its newest run

    @property
    def mae(self) -> str | None:
        """The MAE baseline of the first seed (what single-run pages open on)."""
        return (self.runs.get("mae") or [None])[0]

    @property
    def seeds(self) -> int:
        return max((len(v) for v in self.runs.values()), default=0)

    def ordered_runs(self) -> list[str]:
        """MAE, LayerLock, then the ablations; within a role, seed order."""
        return [r for role in ROLES for r in self.runs.get(role, [])]

    def ordered_groups(self) -> list[str]:
        return [self.groups[role] for role in ROLES if role in self.groups]


def bundles(runs: pd.DataFrame) -> dict[str, Bundle]:
    """Every demo and study in a run list (``io.list_runs``: newest first), newest first.

    Members are the FINISHED runs whose group tag is ``<id>-<role>``; ``<id>`` must look like a
    demo's id, a default study id, or be the name of a study's summary run. Pure: a function of the
    frame only."""
    if runs.empty:
        return {}
    studies = set(runs.loc[runs["method"] == schema.METHOD_STUDY, "name"].dropna())
    pool = runs[runs["group"].notna() & (runs["status"] == "FINISHED") & runs["parent"].isna()]
    pool = pool.sort_values(["seed", "start_time"], kind="stable", na_position="last")
    found: dict[str, dict] = {}
    for row in pool.itertuples(index=False):
        m = _BUNDLE_GROUP.match(str(row.group))
        if not m:
            continue
        bid, role = m["id"], m["role"]
        kind = "demo" if _DEMO_ID.match(bid) else "study" if (bid in studies or _STUDY_ID.match(bid)) else None
        if kind is None:
            continue
        b = found.setdefault(bid, {"kind": kind, "runs": {}, "groups": {}, "newest": row.start_time})
        b["runs"].setdefault(role, []).append(row.run_id)
        b["groups"][role] = row.group
        if pd.notna(row.start_time) and (pd.isna(b["newest"]) or row.start_time > b["newest"]):
            b["newest"] = row.start_time
    out = [Bundle(v["kind"], k, v["runs"], v["groups"], v["newest"]) for k, v in found.items() if "mae" in v["runs"]]
    out.sort(key=lambda b: pd.Timestamp(b.newest) if pd.notna(b.newest) else pd.Timestamp.min, reverse=True)
    return {b.id: b for b in out}


def latest_bundle(runs: pd.DataFrame) -> Bundle | None:
    """The demo or study the newest finished training run belongs to; None when that run is not
    part of one (a run trained after the demo: today's "most recent" defaults apply)."""
    newest = most_recent(runs, 1)
    if not newest:
        return None
    return next((b for b in bundles(runs).values() if newest[0] in b.ordered_runs()), None)


def compare_opening(bundle: Bundle) -> tuple[list[str], list[str]]:
    """``(groups, runs)`` the Compare page opens on: the bundle's groups where it has two or more
    seeds, else its single runs; MAE first, then LayerLock, then the ablations."""
    if bundle.seeds >= 2:
        return bundle.ordered_groups(), []
    return [], bundle.ordered_runs()


def opening(runs: pd.DataFrame) -> Bundle | None:
    """The bundle the pages open on: the one a ``?demo=``/``?study=`` link named, else the latest."""
    named = st.session_state.get(OPENING_KEY)
    if named:
        found = bundles(runs).get(named)
        if found is not None:
            return found
    return latest_bundle(runs)


def bundle_from_url() -> None:
    """``?demo=ID`` / ``?study=ID``: open every page on that demo's or study's runs, once per value
    (the run selection is cleared so the opening shows); an id not in the store is ignored (nothing
    from the URL is used but as a key into the store's own ids)."""
    for kind in ("demo", "study"):
        wanted = st.query_params.get(kind)
        if not wanted:
            continue
        if st.session_state.get(URL_BUNDLE_KEY) == (kind, wanted):
            return
        st.session_state[URL_BUNDLE_KEY] = (kind, wanted)
        try:
            known = bundles(loaders.runs(tracking_uri()))
        except LayerLockError:
            return
        found = known.get(wanted)
        if found is not None and found.kind == kind:
            st.session_state[OPENING_KEY] = found.id
            set_selected([])
            st.session_state.pop(SELECTED_GROUPS_KEY, None)  # the opening decides
        return


def default_run(runs: pd.DataFrame, options: list[str] | None = None) -> str | None:
    """Single-run pages with nothing selected: the opening's MAE baseline, else the most recent."""
    pool = runs if options is None else runs[runs["run_id"].isin(options)]
    bundle = opening(runs)
    if bundle is not None and bundle.mae in set(pool["run_id"]):
        return bundle.mae
    recent = most_recent(pool, 1)
    return recent[0] if recent else None


def default_runs(runs: pd.DataFrame, n: int = 3) -> list[str]:
    """Multi-run pickers with nothing selected: the opening's runs (when it has one seed; groups
    otherwise, see :func:`compare_opening`), else recent runs, one per method first."""
    bundle = opening(runs)
    if bundle is not None:
        return compare_opening(bundle)[1]
    return recent_per_method(runs, n)


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


URL_RUNS_KEY = "runs_from_url"
MAX_URL_RUNS = 200


def runs_from_url() -> None:
    """``?runs=ID,ID,...`` (the Study page's links to the runs behind a claim) selects those runs,
    once per value; ids not in the store are dropped. With ``&grouped=1`` the runs that make up
    two or more seeds of one group are selected as that group (the Compare page's group picker)."""
    wanted = st.query_params.get("runs")
    grouped = st.query_params.get("grouped") == "1"
    if not wanted or st.session_state.get(URL_RUNS_KEY) == (wanted, grouped):
        return
    st.session_state[URL_RUNS_KEY] = (wanted, grouped)
    try:
        frame = loaders.runs(tracking_uri())
    except LayerLockError:
        return
    known = set(frame["run_id"])
    ids = [r for r in dict.fromkeys(wanted.split(",")[:MAX_URL_RUNS]) if r in known]
    if not ids:
        return
    st.session_state.pop(OPENING_KEY, None)
    chosen_groups: list[str] = []
    if grouped:
        by_id = frame.set_index("run_id")["group"]
        counts = pd.Series([by_id[r] for r in ids if pd.notna(by_id[r])]).value_counts(sort=False)
        chosen_groups = [str(g) for g, n in counts.items() if n >= 2]
        ids = [r for r in ids if by_id[r] not in chosen_groups]
    st.session_state[SELECTED_GROUPS_KEY] = chosen_groups
    set_selected(ids)


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
        current = default_run(runs, options) or options[0]
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
    """A multiselect of runs seeded with the selection (else :func:`default_runs`)."""
    options = list(runs["run_id"])
    labels = picker_labels(runs)
    current = [r for r in selected() if r in options]
    if not current and not allow_empty:
        current = [r for r in default_runs(runs, default_n) if r in options] or recent_per_method(runs, default_n)
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
