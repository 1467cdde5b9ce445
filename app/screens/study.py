"""Study: one `python -m experiments study` read claim by claim: each claim with its verdict and
95% intervals, its figures (Plotly, drawn from results.json), and links to the runs behind it."""

from __future__ import annotations

import json

import streamlit as st

from analysis import schema
from app.views import loaders, state
from app.views import study as sv

st.title("Study")
uri = state.tracking_uri()
runs = state.load_runs()
studies = runs[runs["method"] == schema.METHOD_STUDY]
if studies.empty:
    st.info(
        "No study in this store yet. `python -m experiments study --seeds 0,1,2` measures the paper's claims "
        "over seeds and logs a study run; it shows here."
    )
    st.stop()

labels = {r.run_id: f"{r.name or r.run_id[:8]} · {r.status.lower()} · {r.run_id[:8]}" for r in studies.itertuples()}
options = list(labels)
bundle = state.opening(runs)
named = [
    r.run_id for r in studies.itertuples() if bundle is not None and bundle.kind == "study" and r.name == bundle.id
]
state.seed("study_pick", options, named[0] if named else options[0])
sid = st.selectbox("Study", options, key="study_pick", format_func=labels.get)
row = studies.set_index("run_id").loc[sid]
with state.notice_errors():
    report, results = loaders.study_report(uri, sid, loaders.row_version(row["status"], row["end_time"]))
if results is None:
    st.info("This study has not written its results yet (its run logs results.json when it ends).")
    st.stop()

seeds = results.get("seeds", [])
st.caption(
    f"{results.get('study_id', row['name'])} · seeds {', '.join(map(str, seeds))} (N={len(seeds)}) · budget "
    f"`{results.get('budget', '?')}` · {results.get('interval', '')}. Verdict 'held' when the whole interval lies "
    "on the claimed side, 'inconclusive' when it holds the threshold."
)
d = st.columns([1, 1, 4])
if report is not None:
    d[0].download_button("report.md", report, file_name="report.md", key="study_md")
d[1].download_button("results.json", json.dumps(results, indent=2), file_name="results.json", key="study_json")

known = set(runs["run_id"])
for key, claim in (results.get("claims") or {}).items():
    title = sv.CLAIM_TITLES.get(key, key)
    verdict = sv.claim_verdict(claim)
    st.subheader(title + (f" — {verdict}" if verdict else ""))
    st.markdown(f"**Claim:** {claim.get('claim', '')}  \n*Figure:* {claim.get('figure', '')}")
    st.dataframe(sv.claim_rows(key, claim), hide_index=True, key=f"study_rows_{key}")
    figs = sv.claim_figures(key, claim)
    cols = st.columns(len(figs)) if len(figs) > 1 else [st]
    for i, (col, fig) in enumerate(zip(cols, figs, strict=True)):
        col.plotly_chart(fig, key=f"study_fig_{key}_{i}")
    behind = sv.claim_runs(results, key, known)
    if behind:
        ids = ",".join(behind)
        link = st.columns([1, 1, 4])
        link[0].page_link(
            "screens/runs.py",
            label=f"Runs page ({len(behind)} runs)",
            icon=":material/table_rows:",
            query_params={"runs": ids},
        )
        link[1].page_link(
            "screens/compare.py",
            label="Compare them",
            icon=":material/compare_arrows:",
            query_params={"runs": ids, "grouped": "1"},
        )
