"""Attribution: which blocks and which pixels a probe's prediction rests on (captum).

A linear probe is fitted on the run's frozen final features for a classification task; its
prediction on one validation clip is attributed to every block (LayerConductance or
LayerIntegratedGradients) and to the input pixels (IntegratedGradients), frame by frame."""

from __future__ import annotations

import streamlit as st

from analysis import LayerLockError, first_line
from app.views import charts, loaders, state

METHOD_LABELS = {"conductance": "LayerConductance", "layer_ig": "LayerIntegratedGradients"}

st.title("Attribution")
uri = state.tracking_uri()
runs = state.load_runs()


@st.cache_data(show_spinner=False, max_entries=16)
def run_tasks(uri: str, run_id: str, version: str) -> tuple[dict[str, int], int]:
    """Classification tasks of the run's dataset and the size of its validation split."""
    from analysis import attribution, io

    return attribution.checkpoint_tasks(io.load_checkpoint(run_id, uri))


@st.cache_data(show_spinner=False, max_entries=32)
def explain(uri: str, run_id: str, version: str, task: str, clip: int, method: str, n_steps: int):
    from analysis import attribution, io

    return attribution.explain(io.load_checkpoint(run_id, uri), task, clip, method, n_steps, run_id=run_id)


top = st.columns([3, 2, 2])
run_id = state.pick_run(runs, key="attr_run", container=top[0])
with state.notice_errors():
    rec, ver = loaders.run_version(uri, run_id)
try:
    with st.spinner("Loading the run's checkpoint…"):
        tasks, n_val = run_tasks(uri, run_id, ver)
except LayerLockError as err:
    st.warning(f"Cannot attribute this run: {first_line(err)}. Pick a run that saved checkpoints.")
    st.stop()
if not tasks:
    st.info("This run's dataset has no classification task to attribute.")
    st.stop()

state.seed("attr_task", list(tasks), next(iter(tasks)))
task = top[1].selectbox(
    "Task (probe target)", list(tasks), key="attr_task", format_func=lambda t: f"{t} ({tasks[t]} classes)"
)
method = top[2].selectbox("Per-block method", list(METHOD_LABELS), key="attr_method", format_func=METHOD_LABELS.get)
c = st.columns([2, 2, 3])
clip = int(c[0].number_input("Validation clip", 0, max(n_val - 1, 0), 0, key="attr_clip"))
n_steps = int(c[1].select_slider("Integration steps", [8, 16, 32, 64], value=16, key="attr_steps"))

try:
    with st.spinner("Fitting a linear probe and integrating gradients…"):
        result = explain(uri, run_id, ver, task, clip, method, n_steps)
except LayerLockError as err:
    st.warning(first_line(err))
    st.stop()

m = st.columns(4)
m[0].metric(
    "Predicted class (explained)",
    result.target,
    f"p = {result.probs[result.target]:.2f}",
    delta_color="off",
    delta_arrow="off",
)
m[1].metric("True class", result.label)
m[2].metric(
    "Probe accuracy (val)",
    f"{result.probe_acc:.0%}",
    f"chance {result.probe_chance:.0%}",
    delta_color="off",
    delta_arrow="off",
)
m[3].metric(
    "IG convergence δ",
    f"{result.saliency_delta:.2g}",
    help="|sum of input attributions − (F(x) − F(baseline))|: small means the integral is accurate",
)
if result.probe_acc <= result.probe_chance * 1.5:
    st.caption(
        "The probe is near chance on this run's features (short or early run), so the attributions "
        "explain a weak prediction."
    )

left, right = st.columns([3, 2])
left.plotly_chart(
    charts.attribution_bars(result.blocks, title=f"{result.method}: attribution by block"), key="attr_blocks"
)
right.plotly_chart(
    charts.attribution_over_time(result.block_time, title="Where in time each block's share sits"), key="attr_time"
)
st.plotly_chart(
    charts.saliency_frames(
        result.frames, result.saliency, title="Input saliency (IntegratedGradients) over the clip's frames"
    ),
    key="attr_saliency",
)
totals = result.blocks["total"]
st.caption(
    f"Baseline: the all-black clip. Every block's signed total is ≈ F(x) − F(baseline) by completeness "
    f"(here {totals.min():.4g} … {totals.max():.4g}); the share of |attribution| is what differs with depth."
)
