"""Launch: start `python -m experiments pretrain ...` as a child process and follow it."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import streamlit as st

from analysis import LayerLockError, first_line, schema
from analysis.schedule import validate_schedule
from app import jobs
from app.views import charts, errors, loaders, state

FROM_CONFIG = "(from config)"
OBJECTIVES = [FROM_CONFIG, "pixel", "layerlock", "latent_scheduled", "latent_naive"]
DATASETS = [FROM_CONFIG, "moving_digits", "photo_pans", "video_folder"]
NO_SCHEDULE, CUSTOM = "none (nothing frozen)", "custom path…"
EXECUTORS = ["local", "serial", "ray"]  # python -m experiments ... --executor
GRID_SOURCE = "launch-grid"  # a job's source: a freeze-test grid (not one pretrain run)

st.title("Launch a training run")
uri = state.tracking_uri()
st.caption(
    f"Runs start as `python -m experiments pretrain …` child processes of this server and log to `{uri}`. "
    f"Logs go to `{jobs.launch_dir()}`."
)

configs = jobs.config_files()
schedules = jobs.saved_schedules()
schedule_choices = [FROM_CONFIG, NO_SCHEDULE, *[str(p) for p in schedules], CUSTOM]

with st.form("launch_form"):
    a, b, c = st.columns(3)
    config = a.selectbox("Config", [str(p.relative_to(jobs.ROOT)) for p in configs], key="launch_config")
    objective = b.selectbox("Objective", OBJECTIVES, key="launch_objective")
    steps = c.number_input("Steps", min_value=1, value=None, step=50, key="launch_steps", placeholder="from config")
    a, b, c = st.columns(3)
    seed = a.number_input("Seed", value=None, step=1, key="launch_seed", placeholder="from config")
    data = b.selectbox("Data", DATASETS, key="launch_data")
    data_root = c.text_input(
        "Video folder (data.root)", key="launch_data_root", placeholder="root/<class>/*.mp4, for video_folder"
    )
    a, b = st.columns([2, 1])
    schedule_choice = a.selectbox(
        "Freezing schedule",
        schedule_choices,
        key="launch_schedule",
        format_func=lambda s: Path(s).name if s.endswith(".json") else s,
    )
    schedule_path = b.text_input("Schedule JSON path", key="launch_schedule_path", placeholder="for custom path…")
    a, b, c = st.columns(3)
    seeds = a.text_input(
        "Seeds (a seed group)",
        key="launch_seeds",
        placeholder="e.g. 0,1,2: one run per seed",
        help="trains one run per seed, all in one layerlock.group, through the executor",
    )
    executor = b.selectbox(
        "Executor",
        EXECUTORS,
        key="launch_executor",
        help="local: a pool of worker processes; serial: one run after another; ray: Ray tasks",
    )
    workers = c.number_input(
        "Workers",
        min_value=1,
        max_value=jobs.max_jobs(),
        value=min(2, jobs.max_jobs()),
        key="launch_workers",
        help=f"worker processes for local (at most ${jobs.MAX_JOBS_ENV})",
    )
    a, b = st.columns([1, 2])
    run_name = a.text_input("Run name", key="launch_run_name", placeholder="generated")
    extra = b.text_area(
        "More overrides (key=value per line)",
        key="launch_overrides",
        height=80,
        placeholder="model.depth=4\ntrain.batch_size=16",
    )
    submitted = st.form_submit_button("Start training", type="primary", key="launch_submit")


def check_schedule(path: Path, n_blocks: int | None = None, total_steps: int | None = None) -> None:
    """A schedule file that the trainer will accept, or LayerLockError with one line."""
    path = path if path.is_absolute() else jobs.ROOT / path  # the child runs in the repository root
    if not path.is_file():
        raise LayerLockError(f"schedule file not found: {path}")
    try:
        validate_schedule(json.loads(path.read_text(encoding="utf-8")), total_steps=total_steps, n_blocks=n_blocks)
    except UnicodeDecodeError:
        raise LayerLockError(f"{path.name}: not a text file (a schedule is JSON text)") from None
    except json.JSONDecodeError as err:
        raise LayerLockError(f"{path.name}: not valid JSON ({err.msg})") from None


def build_overrides() -> tuple[list[str], str]:
    """The ``--set`` list from the form and the run name; raises LayerLockError/ValueError."""
    overrides = []
    if objective != FROM_CONFIG:
        overrides.append(f"objective.name={objective}")
    if steps:
        overrides.append(f"train.steps={int(steps)}")
    if seed is not None:
        overrides.append(f"train.seed={int(seed)}")
    if data != FROM_CONFIG:
        overrides.append(f"data.name={data}")
    if data_root.strip():
        overrides.append(jobs.string_override("data.root", str(Path(data_root.strip()).expanduser().resolve())))
    if schedule_choice == NO_SCHEDULE:
        overrides.append("freeze.schedule=null")
    elif schedule_choice != FROM_CONFIG:
        raw = schedule_path.strip() if schedule_choice == CUSTOM else schedule_choice
        if not raw:
            raise LayerLockError("custom schedule: enter the path of a schedule JSON file")
        path = Path(raw).expanduser().resolve()
        check_schedule(path)
        overrides.append(jobs.string_override("freeze.schedule", str(path)))
    overrides += jobs.override_lines(extra)
    name = run_name.strip() or jobs.new_run_name(objective if objective != FROM_CONFIG else Path(config).stem)
    overrides.append(jobs.string_override("tracking.run_name", name))  # `exp #2` stays `exp #2`
    return overrides, name


def seed_group_args() -> list[str]:
    """``--seeds S,S --executor E --workers N`` for a seed group (none without seeds); raises LayerLockError."""
    text = seeds.strip()
    if not text:
        return []
    if seed is not None:
        raise LayerLockError("Seed and Seeds both choose the seed: keep one")
    items = [item.strip() for item in text.split(",")]
    if not all(item.lstrip("-").isdigit() for item in items) or len(set(items)) != len(items):
        raise LayerLockError(f"Seeds expects distinct comma-separated integers, got '{text}'")
    return ["--seeds", ",".join(items), "--executor", executor, "--workers", str(int(workers))]


if submitted:
    try:
        overrides, name = build_overrides()
        # Check the config here so a typo is one line now, not a failed child later.
        from analysis import load_config

        cfg = load_config(jobs.ROOT / config, overrides)
        if isinstance(cfg.freeze.schedule, str):
            check_schedule(Path(cfg.freeze.schedule), cfg.model.depth, cfg.train.steps)
        argv = jobs.pretrain_argv(config, overrides, {schema.TAG_LAUNCHED_FROM: "dashboard"}, uri)
        argv += seed_group_args()
        job = jobs.start(argv, name, uri, source="launch")
    except (LayerLockError, ValueError) as err:  # bad input, or jobs.JobLimitReached
        st.warning(f"Not started: {first_line(err)}")
    else:
        state.remember_job(job.job_id)
        loaders.refresh_live()
        st.success(f"Started {name} (pid {job.pid}).")


# ----------------------------------------------------------------------------- a freeze-test grid

st.subheader("Freeze-test grid")
st.caption(
    "Branches the baseline's `freeze-test --grid` children (blocks 0..L-1 frozen from its checkpoint at T) "
    "through the executor; the grid is on the Freeze test page as the children finish."
)
_runs = loaders.runs(uri)
_baselines = _runs[(_runs["status"] == "FINISHED") & (_runs["method"] != schema.METHOD_FREEZE_TEST)]
_names = dict(zip(_baselines["run_id"], _baselines["name"], strict=True))
with st.form("grid_form"):
    a, b, c = st.columns([2, 1, 1])
    baseline = a.selectbox(
        "Baseline run",
        list(_names),
        index=None,
        key="grid_baseline",
        format_func=lambda rid: f"{_names[rid]} · {rid[:8]}",
        placeholder="a FINISHED run with checkpoints",
    )
    grid_executor = b.selectbox("Executor", EXECUTORS, key="grid_executor")
    grid_workers = c.number_input(
        "Workers",
        min_value=1,
        max_value=jobs.max_jobs(),
        value=min(2, jobs.max_jobs()),
        key="grid_workers",
        help=f"worker processes for local (at most ${jobs.MAX_JOBS_ENV})",
    )
    grid_submitted = st.form_submit_button("Start the grid", key="grid_submit")

if grid_submitted:
    if baseline is None:
        st.warning("Not started: choose a baseline run")
    else:
        try:
            argv = jobs.freeze_test_argv(baseline, grid_executor, int(grid_workers), uri)
            job = jobs.start(argv, f"freeze-test {baseline[:8]}", uri, source=GRID_SOURCE, tag_run=False)
        except (LayerLockError, ValueError) as err:  # jobs.JobLimitReached
            st.warning(f"Not started: {first_line(err)}")
        else:
            state.remember_job(job.job_id)
            st.success(f"Started the freeze-test grid of {baseline[:8]} (pid {job.pid}).")


def _job_run(job: jobs.Job) -> str | None:
    """The job's run: tagged with its job id (a job started before job-id tags: by run name)."""
    if f"{schema.TAG_JOB}={job.job_id}" in job.argv:
        return loaders.job_run(uri, job.job_id)
    runs = loaders.runs(uri)
    match = runs[runs["name"] == job.run_name]
    return None if match.empty else match.iloc[0]["run_id"]


def _progress(job: jobs.Job, status: str) -> None:
    """Progress read from MLflow: the run (found by its job-id tag), its last step and its loss curve."""
    try:
        rid = _job_run(job)
    except LayerLockError:
        return
    if rid is None:
        st.caption(
            "Waiting for the run to appear in the tracking store…"
            if status == "running"
            else "The run never reached the tracking store."
        )
        return
    try:
        rec, ver = loaders.run_version(uri, rid)
        hist = loaders.history(uri, rid, ver, (schema.LOSS,))
    except LayerLockError as err:
        st.caption(str(err))
        return
    loss = hist[hist["metric"] == schema.LOSS]
    total = rec.param_int("train.steps") or 0
    done = int(loss["step"].max()) + 1 if len(loss) else 0
    if status == "running" and total:
        st.progress(min(done / total, 1.0), text=f"step {done} / {total} · MLflow run `{rid[:8]}` · {rec.status}")
    else:
        st.caption(f"MLflow run `{rid}` · {rec.status} · {done} / {total} steps logged")
    if len(loss) >= 2:
        st.plotly_chart(
            charts.lines({job.run_name: loss}, "step", "value", "step", schema.LOSS, height=240),
            key=f"launch_loss_{job.job_id}",
        )


def _job_panel(job: jobs.Job, newest: bool) -> None:
    status = jobs.status(job)
    started = time.strftime("%H:%M:%S", time.localtime(job.started))
    icon = {"running": ":material/progress_activity:", "finished": ":material/check_circle:"}.get(
        status, ":material/cancel:"
    )
    with st.expander(
        f"{job.run_name} · {status} · started {started}", expanded=newest or status == "running", icon=icon
    ):
        st.code(shlex.join(["python", *job.argv[1:]]), language="bash")
        if job.source == GRID_SOURCE:
            st.caption("A freeze-test grid: the log below has one line per finished child.")
        else:
            _progress(job, status)
        if status == "running":
            if st.button("Cancel", key=f"launch_cancel_{job.job_id}", help="SIGINT, then SIGTERM if needed"):
                how = jobs.cancel(job)
                loaders.refresh_live()
                st.warning(f"Cancelled ({how}).")
        elif status == "finished":
            rid = jobs.run_id(job)
            st.success(f"Finished: run `{rid}` is on the Runs page." if rid else "Finished.")
        else:
            err = jobs.last_error(job)
            st.warning(f"The child exited ({status}){': ' + err.removeprefix('error: ') if err else ''}.")
        log = jobs.tail(job.log_path)
        st.code(log or "(no output yet)", language=None)


def jobs_section() -> None:
    mine = state.session_jobs()
    found = jobs.list_jobs()
    ordered = [j for j in found if j.job_id in mine] + [j for j in found if j.job_id not in mine]
    if not ordered:
        st.info("No runs launched from the dashboard yet. Fill in the form and press **Start training**.")
        return
    was_running = st.session_state.get("launch_running", set())
    running = {j.job_id for j in ordered if jobs.status(j) == "running"}
    st.session_state["launch_running"] = running
    if was_running - running:  # something finished: fresh run list, and a full rerun stops the timer
        loaders.refresh_live()
        st.rerun()
    for i, job in enumerate(ordered[:8]):
        _job_panel(job, newest=i == 0)


st.subheader("Launched runs")
live = any(jobs.status(j) == "running" for j in jobs.list_jobs())
if st.button("Refresh now", key="launch_refresh"):
    loaders.refresh_live()  # fresh data, not what the short-lived caches hold
errors.fragment(jobs_section, run_every=2 if live else None)()
