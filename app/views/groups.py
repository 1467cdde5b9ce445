"""Groups of seeds on the pages: which runs form a group, the group picker, labels and colours.

A group is the set of runs sharing a ``layerlock.group`` tag (one config, several
``train.seed``). Only FINISHED runs count as members: a run still training would pull the
mean towards an unfinished loss. The canonical group selection lives in
``st.session_state["selected_groups"]`` (like ``selected_runs``); while it has never been set,
the Compare page offers the recent groups of two or more runs.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st
from plotly.colors import qualitative

from analysis.stats import group_summary, summary_table
from app.views import charts, state

SELECTED_GROUPS_KEY = state.SELECTED_GROUPS_KEY


def finished_members(runs: pd.DataFrame) -> dict[str, list[str]]:
    """group -> its finished, browsable runs in seed order; groups ordered by their newest run."""
    pool = state.browsable(runs)
    pool = pool[pool["group"].notna() & (pool["status"] == "FINISHED")]
    newest_first = list(dict.fromkeys(pool["group"]))  # the run list is newest first
    ordered = pool.sort_values(["seed", "start_time"], kind="stable", na_position="last")
    return {g: list(ordered.loc[ordered["group"] == g, "run_id"]) for g in newest_first}


def default_groups(members: dict[str, list[str]], n: int = 3) -> list[str]:
    """The ``n`` most recent groups holding at least two finished runs."""
    return [g for g, ids in members.items() if len(ids) >= 2][:n]


def group_label(group: str, members: dict[str, list[str]], runs: pd.DataFrame) -> str:
    """``group · N runs`` (the name already says objective and dataset)."""
    n = len(members.get(group, []))
    return f"{group} · {n} run{'s' if n != 1 else ''}"


def _sync_groups(key: str) -> None:
    st.session_state[SELECTED_GROUPS_KEY] = list(st.session_state.get(key) or [])


def pick_groups(
    runs: pd.DataFrame, members: dict[str, list[str]], key: str, label: str = "Groups of seeds", help: str | None = None
) -> list[str]:
    """A multiselect of groups, seeded with the group selection (else the opening demo's or study's
    groups, else recent multi-seed groups; but only when no runs are selected either: a run
    selection made elsewhere wins)."""
    options = list(members)
    if SELECTED_GROUPS_KEY in st.session_state:
        current = [g for g in st.session_state[SELECTED_GROUPS_KEY] if g in options]
    elif state.selected():
        current = []
    else:
        bundle = state.opening(runs)  # after a demo or study: its groups (none when it has one seed)
        current = default_groups(members) if bundle is None else state.compare_opening(bundle)[0]
        current = [g for g in current if g in options]
    st.session_state[key] = current
    return st.multiselect(
        label,
        options,
        key=key,
        format_func=lambda g: group_label(g, members, runs),
        on_change=_sync_groups,
        args=(key,),
        help=help,
    )


def item_colors(methods: dict[str, str | None]) -> dict[str, str]:
    """label -> colour: the method's colour while methods are distinct, else a qualitative palette."""
    by_method = {label: charts.METHOD_COLORS.get(m or "") for label, m in methods.items()}
    if all(by_method.values()) and len(set(by_method.values())) == len(by_method):
        return by_method  # type: ignore[return-value]
    palette = qualitative.Plotly
    return {label: palette[i % len(palette)] for i, label in enumerate(methods)}


def groups_table(runs: pd.DataFrame, metrics: list[str], min_runs: int = 2) -> pd.DataFrame:
    """Runs page: one row per group of at least ``min_runs`` finished runs in ``runs``:
    ``group, method, dataset, runs, seeds`` and ``mean ± sd (N)`` text per metric present."""
    finished = runs[runs["group"].notna() & (runs["status"] == "FINISHED")]
    sizes = finished.groupby("group", sort=False)["run_id"].count()
    finished = finished[finished["group"].isin(sizes[sizes >= min_runs].index)]
    if finished.empty:
        return pd.DataFrame()
    present = [
        m for m in metrics if m in finished.columns and pd.to_numeric(finished[m], errors="coerce").notna().any()
    ]
    text = summary_table(group_summary(finished, present, by="group"))
    info = finished.groupby("group", sort=False).agg(
        method=("method", lambda s: ", ".join(sorted(set(s.dropna()))) or None),
        dataset=("dataset", lambda s: ", ".join(sorted(set(s.dropna()))) or None),
        runs=("run_id", "count"),
        seeds=("seed", lambda s: ", ".join(str(int(v)) for v in sorted(s.dropna()))),
    )
    table = info.join(text) if not text.empty else info
    return table.reset_index()
