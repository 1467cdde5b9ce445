"""Schedule: derive a freezing schedule from a logged run, see its predicted saving, download or
save it, and launch a LayerLock run with it."""

from __future__ import annotations

import json
import shlex

import pandas as pd
import streamlit as st

from analysis import LayerLockError, first_line, io, schema
from analysis.convergence import RULES
from analysis.schedule import schedule_for_run
from app import jobs
from app.views import charts, controls, loaders, state

LAYERLOCK_CONFIG = jobs.CONFIG_DIR / "layerlock_tiny.yaml"

st.title("Freezing schedule")
uri = state.tracking_uri()
runs = state.load_runs()

top = st.columns([3, 2])
run_id = state.pick_run(runs, key="sched_run", label="Derive from run", container=top[0])
with state.notice_errors():
    rec, ver = loaders.run_version(uri, run_id)
    flop_model = loaders.flop_model(uri, run_id, ver)
    time_model = loaders.time_model(uri, run_id, ver)
state.seed("sched_method", list(RULES), "posthoc")
method = top[1].selectbox(
    "Convergence rule", list(RULES), key="sched_method", format_func=lambda m: f"{m} ({RULES[m]['metric']})"
)
rule = RULES[method]

total_steps = rec.param_int("train.steps")
n_blocks = rec.param_int("model.depth") or (flop_model or {}).get("n_blocks")
if not total_steps or not n_blocks:
    st.warning(
        f"Run {rec.name or run_id[:8]} has no train.steps / model.depth params, so a schedule "
        "cannot be sized. Pick a run logged by the trainer."
    )
    st.stop()
if rec.status != "FINISHED":
    st.info(f"Run status is {rec.status}: convergence is judged on what it logged so far.")

c = st.columns([3, 1.4, 3, 2, 1.6])
threshold, patience = controls.rule_controls(c[0], c[1], method, rule, "sched")
margin = int(
    c[2].slider("safety margin (steps)", 0, max(1, total_steps // 2), 0, max(1, total_steps // 100), key="sched_margin")
)
cap = int(
    c[3].slider(
        "max frozen blocks",
        0,
        int(n_blocks) - 1,
        int(n_blocks) - 1,
        key="sched_cap",
        help="At least one block always trains",
    )
)
quantize = int(
    c[4].number_input(
        "round steps up to",
        0,
        total_steps,
        0,
        key="sched_quantize",
        help="Round each stage's step up to a multiple of this (0: off)",
    )
)

try:
    conv = loaders.convergence(uri, run_id, ver, method, threshold, patience)
    schedule = schedule_for_run(
        run_id,
        conv,
        method=method,
        threshold=threshold,
        patience=patience,
        total_steps=int(total_steps),
        n_blocks=int(n_blocks),
        flop_model=flop_model,
        margin=margin,
        max_frozen=cap,
        quantize=quantize or None,
        time_model=time_model,
    )
except LayerLockError as err:
    st.warning(f"Cannot derive a schedule: {first_line(err)}")
    st.stop()

stages = schedule["stages"]
estimate = schedule.get("predicted_saving_basis") == "estimate"
suffix = " (estimate)" if estimate else ""
m = st.columns(4)
m[0].metric("Stages", len(stages))
m[1].metric("Frozen at the end", f"{stages[-1]['frozen'] if stages else 0} / {n_blocks}")
flop_saving = schedule.get("predicted_flop_saving")
m[2].metric(
    f"Predicted FLOP saving{suffix}",
    "n/a" if flop_saving is None else f"{flop_saving:.1%}",
    help=(
        schedule["prediction"]["flop_model"]
        if estimate
        else "Counted FLOPs from the run's flop_model.json, against training with nothing frozen"
    ),
)
time_saving = schedule.get("predicted_time_saving")
measured = schedule.get("predicted_time_basis") == "time_model"
m[3].metric(
    "Predicted time saving" + (" (measured)" if measured else f" (from FLOPs){suffix}"),
    "n/a" if time_saving is None else f"{time_saving:.1%}",
    help=(
        "From the run's measured step time per frozen-prefix length (time_model.json): "
        if measured
        else "Assumed proportional to FLOPs: "
    )
    + schedule["prediction"]["time_model"],
)
st.caption(
    f"Time saving {'from measured step times' if measured else 'from FLOPs'}: {schedule['prediction']['time_model']}."
)
if estimate:
    st.info(
        f"FLOP savings are an **estimate**: this run has no {io.FLOP_MODEL_ARTIFACT}, so its depth and a uniform "
        "per-block cost stand in for counted FLOPs (every block costs the same, its backward twice its "
        "forward, nothing outside the blocks counted: an upper bound)."
    )
if not stages:
    st.info(
        "No block converged early enough under this rule: the schedule freezes nothing. "
        "Lower the threshold, or pick a longer run."
    )

with state.notice_errors():
    hist = loaders.history(uri, run_id, ver, (schema.FROZEN_BLOCKS,))
actual = hist[hist["metric"] == schema.FROZEN_BLOCKS].set_index("step")["value"]
st.plotly_chart(
    charts.frozen_steps(
        schedule, int(total_steps), actual if actual.any() else None, conv, title="Frozen blocks over training"
    ),
    key="sched_chart",
)

left, right = st.columns([2, 3])
left.dataframe(pd.DataFrame(stages, columns=["step", "frozen"]), hide_index=True, key="sched_stages")
with right:
    with st.expander("Schedule JSON", expanded=False):
        st.json(schedule)

text = json.dumps(schedule, indent=2) + "\n"
b = st.columns(3)
b[0].download_button(
    "Download JSON", text, file_name=f"schedule_{run_id[:8]}.json", mime="application/json", key="sched_download"
)
if b[1].button(
    "Save as artifact",
    key="sched_save",
    help=f"Stores the schedule as {io.DERIVED_SCHEDULE_ARTIFACT} on the source run",
):
    with state.notice_errors():
        where = io.log_schedule_artifact(run_id, schedule, uri)
    st.success(f"Saved as {where}")

if rec.method == schema.METHOD_OWN_LOOP:
    st.caption(
        "This run comes from your own training loop (`core.monitor.LayerMonitor`): apply the schedule "
        "there with `core.freezing.apply_schedule(schedule, blocks, step, optimizer)` at the start of each "
        'step (README, "Use it in your own training loop").'
    )
    st.stop()
match = st.toggle(
    "Match the source run's model, data and training settings",
    value=True,
    key="sched_match",
    help=f"Otherwise {LAYERLOCK_CONFIG.name} as it is (its depth must equal n_blocks={n_blocks})",
)
name = f"layerlock-from-{rec.name or run_id[:8]}"
overrides = jobs.twin_overrides(rec.params) if match else []
preview = jobs.pretrain_argv(
    LAYERLOCK_CONFIG.relative_to(jobs.ROOT),
    [*overrides, "freeze.schedule=<schedule file>"],
    {io.TAG_SCHEDULE_SOURCE: run_id},
    uri,
)
with st.expander("Command the launch button runs", expanded=False):
    st.code(shlex.join(["python", *preview[1:]]), language="bash")
if b[2].button("Launch LayerLock with this schedule", key="sched_launch", type="primary"):
    path = jobs.write_schedule(schedule, f"schedule_{run_id[:8]}_{jobs.new_run_name('ll')}")
    run_name = jobs.new_run_name("layerlock")
    argv = jobs.pretrain_argv(
        LAYERLOCK_CONFIG,
        [*overrides, f"freeze.schedule={path}", f"tracking.run_name={run_name}"],
        {io.TAG_SCHEDULE_SOURCE: run_id},
        uri,
    )
    try:
        job = jobs.start(argv, run_name, uri, source="schedule", extra={"schedule": str(path)})
    except jobs.JobLimitReached as err:
        st.warning(f"Not started: {err}")
        st.stop()
    state.remember_job(job.job_id)
    st.success(f"Started {run_name} (pid {job.pid}) with {path.name}.")
    st.page_link("screens/launch.py", label="Follow its progress on Launch", icon=":material/rocket_launch:")
