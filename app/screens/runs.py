"""Runs: every run of the tracking store, filterable; the selection carries into the other pages."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analysis import metric_help, schema
from app.views import charts, export, groups, loaders, state

st.title("Runs")
uri = state.tracking_uri()
runs = state.load_runs()

c1, c2, c3, c4 = st.columns([2, 2, 2, 3])
experiments = c1.multiselect("Experiment", sorted(runs["experiment"].dropna().unique()), key="runs_experiment")
methods = c2.multiselect("Method", sorted(runs["method"].dropna().unique()), key="runs_method")
statuses = c3.multiselect("Status", sorted(runs["status"].dropna().unique()), key="runs_status")
search = c4.text_input("Search name or run id", key="runs_search", placeholder="e.g. mae or 3f2a")
hide_children = st.toggle(
    "Hide freeze-test children",
    value=True,
    key="runs_hide_children",
    help="Runs tagged layerlock.parent are cells of a freeze-test sweep (see Freeze test)",
)

view = runs
if experiments:
    view = view[view["experiment"].isin(experiments)]
if methods:
    view = view[view["method"].isin(methods)]
if statuses:
    view = view[view["status"].isin(statuses)]
if search.strip():
    needle = search.strip().lower()
    view = view[view["name"].str.lower().str.contains(needle, regex=False) | view["run_id"].str.startswith(needle)]
if hide_children:
    view = view[~view["method"].isin(state.CHILD_METHODS) & view["parent"].isna()]
studies = runs[runs["method"] == schema.METHOD_STUDY]
view = view[view["method"] != schema.METHOD_STUDY]


def _saving(row) -> float:
    if row.status != "FINISHED":
        return np.nan
    value = loaders.compute_saving(uri, row.run_id, loaders.row_version(row.status, row.end_time))
    return np.nan if value is None else value


# Savings need each run's flop model (an artifact read per run, cached once the run has ended):
# computed for the newest SAVING_ROWS rows shown.
SAVING_ROWS = 50
table = view.copy()
table["saving"] = [_saving(r) for r in view.head(SAVING_ROWS).itertuples(index=False)] + [np.nan] * max(
    0, len(view) - SAVING_ROWS
)
eval_cols = [c for c in table.columns if c.startswith(schema.EVAL)]
columns = [
    "name",
    "method",
    "dataset",
    "status",
    "steps",
    "final_loss",
    "saving",
    *eval_cols,
    "group",
    "seed",
    "start_time",
    "experiment",
    "run_id",
    "schedule_source",
    "failure_reason",
]
grouped = groups.groups_table(view, ["final_loss", *eval_cols])
if not grouped.empty:
    st.markdown("**Groups of seeds** (runs that differ only in `train.seed`)")
    st.caption(
        "Finished runs sharing a `layerlock.group` tag; each cell is mean ± sd (N runs). "
        f"final loss: {metric_help(schema.LOSS)}. Compare groups on the Compare page."
    )
    st.dataframe(
        grouped,
        hide_index=True,
        key="runs_groups_table",
        column_config={
            "group": st.column_config.TextColumn("group"),
            "final_loss": st.column_config.TextColumn("final loss"),
            **{c: st.column_config.TextColumn(c.removeprefix(schema.EVAL)) for c in eval_cols},
        },
    )
    st.download_button(
        "Download groups (CSV)", export.to_csv(grouped), file_name="groups.csv", mime="text/csv", key="runs_groups_csv"
    )
st.caption(
    f"{len(view)} of {len(runs)} runs · store `{uri}` · saving = counted FLOPs saved by freezing, "
    "against the same run with nothing frozen"
)
st.dataframe(
    table[columns],
    hide_index=True,
    key="runs_table",
    column_config={
        "final_loss": st.column_config.NumberColumn("final loss", format="%.4f"),
        "saving": st.column_config.ProgressColumn("saving", format="percent", min_value=0.0, max_value=1.0),
        "start_time": st.column_config.DatetimeColumn("started", format="YYYY-MM-DD HH:mm"),
        "run_id": st.column_config.TextColumn("run id"),
        **{c: st.column_config.NumberColumn(c.removeprefix(schema.EVAL), format="%.3f") for c in eval_cols},
    },
)
st.download_button(
    "Download runs (CSV)",
    export.to_csv(table[columns]),
    file_name="runs.csv",
    mime="text/csv",
    key="runs_csv",
    help="The runs shown (filters applied), every value at full float precision",
)

if not studies.empty:
    with st.expander(f"Studies ({len(studies)}): the paper's claims over seeds, with intervals", expanded=False):
        labels = {r.run_id: f"{r.name or r.run_id[:8]} ({r.status})" for r in studies.itertuples(index=False)}
        sid = st.selectbox("Study", list(labels), format_func=labels.get, key="runs_study")
        srow = studies.set_index("run_id").loc[sid]
        with state.notice_errors():
            report, results = loaders.study_report(uri, sid, loaders.row_version(srow["status"], srow["end_time"]))
            if report is None:
                st.info("This study has not written its report yet.")
            else:
                st.download_button("Download report.md", report, file_name="report.md", key="runs_study_md")
                if results is not None:
                    import json

                    st.download_button(
                        "Download results.json",
                        json.dumps(results, indent=2),
                        file_name="results.json",
                        key="runs_study_json",
                    )
                st.markdown(report)

chosen = state.pick_runs(
    runs,
    key="runs_select",
    label="Selected runs (carried to the other pages)",
    allow_empty=True,
    help="The first selected run is the current run of the single-run pages",
)
b1, b2, _ = st.columns([1, 1, 4])
b1.button(
    "Select all shown",
    key="runs_select_shown",
    on_click=state.set_selected,
    args=(list(view["run_id"].head(20)),),
    disabled=view.empty,
)
b2.button("Clear", key="runs_select_clear", on_click=state.set_selected, args=([],), disabled=not chosen)

shown = chosen or state.default_runs(runs, 3) or state.recent_per_method(runs, 3)
if not chosen:
    st.caption("Nothing selected: showing the most recent runs.")
by_id = runs.set_index("run_id")
for rid in shown:
    row = by_id.loc[rid]
    if row["status"] == "FAILED":
        reason = row["failure_reason"] if isinstance(row["failure_reason"], str) else "no reason recorded"
        st.warning(f"Run {row['name'] or rid[:8]} failed: {reason}")
    elif row["status"] == "RUNNING":
        st.info(f"Run {row['name'] or rid[:8]} is still running; its charts grow as it logs (use Refresh).")

series, colors = {}, {}
with state.notice_errors():
    for rid in shown:
        rec, ver = loaders.run_version(uri, rid)
        hist = loaders.history(uri, rid, ver, (schema.LOSS,))
        label = f"{rec.name or rid[:8]} ({rec.method or '?'})"
        series[label] = hist[hist["metric"] == schema.LOSS][["step", "value"]]
        colors[label] = charts.METHOD_COLORS.get(rec.method or "")
if any(not f.empty for f in series.values()):
    if len(set(colors.values())) < len(colors):
        colors = {}  # two runs of one method: let Plotly tell them apart
    st.plotly_chart(
        charts.lines(series, "step", "value", "step", schema.LOSS, colors, title="Training loss"), key="runs_loss_chart"
    )
else:
    st.info("The shown runs have not logged train/loss yet.")

current = shown[0] if shown else None
if current:
    with st.expander("Details of the current run", expanded=False):
        with state.notice_errors():
            rec, _ = loaders.run_version(uri, current)
        st.markdown(f"**{rec.name}** · `{rec.run_id}` · experiment `{rec.experiment}` · status {rec.status}")
        left, right = st.columns(2)
        left.dataframe(
            pd.DataFrame(sorted(rec.params.items()), columns=["param", "value"]), hide_index=True, key="runs_params"
        )
        tags = {k: v for k, v in rec.tags.items() if not k.startswith("mlflow.")}
        right.dataframe(pd.DataFrame(sorted(tags.items()), columns=["tag", "value"]), hide_index=True, key="runs_tags")
        with state.notice_errors():
            _, ver = loaders.run_version(uri, current)
            blocks = export.block_metrics_frame(loaders.layer_metrics(uri, current, ver))
        if not blocks.empty:
            st.download_button(
                f"Download per-block metrics of {rec.name or current[:8]} (CSV)",
                export.to_csv(blocks),
                file_name=f"block_metrics_{current[:8]}.csv",
                mime="text/csv",
                key="runs_blocks_csv",
                help="Tidy: metric, block, step, value (every probe step, full float precision)",
            )
