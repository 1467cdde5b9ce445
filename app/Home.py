"""LayerLock Lab dashboard: ``streamlit run app/Home.py`` (bound to 127.0.0.1 by app/.streamlit/config.toml).

This entry script sets up the page, the sidebar (tracking URI, current selection) and the
navigation; each page lives in ``app/screens`` and reads runs through ``analysis`` only.
"""

from __future__ import annotations

import streamlit as st

# `streamlit run app/Home.py` puts only app/ on the path: `app` and `analysis` come from the
# installed project (`pip install -e .`, .ci/setup).
from app.views import errors, loaders, serving, state

st.set_page_config(page_title="LayerLock Lab", page_icon=":material/ac_unit:", layout="wide")

_refused = serving.refusal(st.get_option("server.address"), st.get_option("server.enableXsrfProtection"))
if _refused:
    st.error(_refused)
    st.stop()

PAGES = [
    st.Page("screens/runs.py", title="Runs", icon=":material/table_rows:", url_path="runs", default=True),
    st.Page(
        "screens/convergence.py", title="Convergence", icon=":material/stacked_line_chart:", url_path="convergence"
    ),
    st.Page("screens/schedule.py", title="Schedule", icon=":material/ac_unit:", url_path="schedule"),
    st.Page("screens/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("screens/study.py", title="Study", icon=":material/fact_check:", url_path="study"),
    st.Page("screens/launch.py", title="Launch", icon=":material/rocket_launch:", url_path="launch"),
    st.Page("screens/freeze_test.py", title="Freeze test", icon=":material/grid_on:", url_path="freeze_test"),
    st.Page("screens/attribution.py", title="Attribution", icon=":material/insights:", url_path="attribution"),
]


def _on_uri_change() -> None:
    state.set_tracking_uri(st.session_state["sidebar_uri"])
    loaders.refresh_live()


def sidebar() -> None:
    uri = state.tracking_uri()
    allowed = state.allowed_uris()
    with st.sidebar:
        st.selectbox(
            "Tracking URI",
            allowed,
            index=allowed.index(uri),
            key="sidebar_uri",
            on_change=_on_uri_change,
            help="The MLflow stores the operator configured: $MLFLOW_TRACKING_URI (else "
            "sqlite:///mlflow.db in the working directory), $LAYERLOCK_TRACKING_URIS "
            "(comma-separated), `streamlit run app/Home.py -- --tracking-uri URI`.",
        )
        chosen = state.selected()
        if chosen:
            try:
                labels = state.picker_labels(loaders.runs(uri))
            except Exception:  # the selection summary must never break a page
                labels = {}
            st.caption("Selected runs (the first is the current run):")
            st.markdown(
                "\n".join(f"- {labels.get(r, r[:8])}" for r in chosen[:6])
                + (f"\n- … and {len(chosen) - 6} more" if len(chosen) > 6 else "")
            )
        else:
            st.caption("No runs selected: pages show the most recent run(s).")
        left, right = st.columns(2)
        if left.button("Refresh", key="sidebar_refresh", help="Re-read the run list and running runs"):
            loaders.refresh_live()
        if right.button("Clear", key="sidebar_clear", help="Clear the run selection", disabled=not chosen):
            state.set_selected([])
            st.rerun()


state.bundle_from_url()
state.runs_from_url()
state.run_from_url()
sidebar()
page = st.navigation(PAGES)
try:
    page.run()
except Exception as err:  # last resort: one line on the page, the traceback in the server log
    errors.show(err, f"page {page.title}")
