"""The dashboard under Streamlit's AppTest, page by page, against a temporary tracking store.

The store (module scope, built once) holds a short REAL run of the trainer (newest, with
checkpoints, so every page has something to draw), an older synthetic LayerLock run with a
schedule, a FAILED run, a run with no per-block metrics, and two freeze-test children of the
real run. Pages are reached through ``app/Home.py`` and ``AppTest.switch_page``, the way
``st.navigation`` serves them; widgets are found by key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis import io
from tests.helpers import HOME, TIMEOUT, Store, assert_clean, build_store, frame_with, open_page, point_app_at

PAGES = ("runs", "convergence", "schedule", "compare", "launch", "freeze_test", "attribution")
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return build_store(tmp_path_factory.mktemp("app-store"))


@pytest.fixture
def env(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    point_app_at(store.uri, tmp_path, monkeypatch)
    return store


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def keys(at: AppTest) -> set[str]:
    """Keys of every widget on the page."""
    found = set()
    for node in at.main.children.values():
        stack = [node]
        while stack:
            el = stack.pop()
            key = getattr(el, "key", None)
            if key:
                found.add(key)
            stack.extend(getattr(el, "children", {}).values())
    return found


# ----------------------------------------------------------------------------- pages


def test_runs_page_lists_runs_and_carries_the_selection(env: Store) -> None:
    at = open_page("runs")
    assert_clean(at)
    table = at.dataframe[0].value
    assert {env.real, env.synthetic, env.failed, env.bare} <= set(table["run_id"])
    assert not set(env.children) & set(table["run_id"])  # children hidden by default
    assert charts(at) >= 1 and at.selectbox(key="sidebar_uri").value == env.uri
    assert {"runs_select", "runs_method", "runs_search", "runs_hide_children"} <= keys(at)

    at.multiselect(key="runs_select").set_value([env.synthetic, env.real]).run()
    assert_clean(at)
    at = open_page("convergence", at)
    assert at.selectbox(key="conv_run").value == env.synthetic  # the first selected run carries over
    at = open_page("compare", at)
    assert at.multiselect(key="cmp_runs").value == [env.synthetic, env.real]


def test_convergence_page(env: Store) -> None:
    at = open_page("convergence")
    assert_clean(at)
    assert at.selectbox(key="conv_run").value == env.real  # nothing selected: the most recent run
    assert {"conv_metric", "conv_method", "conv_threshold_posthoc"} <= keys(at)
    assert charts(at) == 3  # heatmap, curves, order
    at.selectbox(key="conv_method").set_value("online").run()
    at.selectbox(key="conv_metric").set_value("grad_norm").run()
    assert_clean(at)
    assert at.number_input(key="conv_patience_online").value == 3 and charts(at) >= 2

    at.selectbox(key="conv_run").set_value(env.bare).run()  # no per-block metrics: a message
    assert_clean(at)
    assert any("no per-block metrics" in i.value for i in at.info) and charts(at) == 0
    at.selectbox(key="conv_run").set_value(env.synthetic).run()
    assert_clean(at)
    assert charts(at) == 3


def test_failed_run_shows_a_warning(env: Store) -> None:
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.session_state["selected_runs"] = [env.failed]
    at.run()
    assert_clean(at)
    assert any("loss is nan" in w.value for w in at.warning)
    at = open_page("convergence", at)
    assert_clean(at)
    assert at.selectbox(key="conv_run").value == env.failed
    assert any("failed" in w.value for w in at.warning)


@pytest.mark.system
def test_schedule_page_derives_saves_and_launches(env: Store) -> None:
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.session_state["selected_runs"] = [env.synthetic]
    at.run()
    at = open_page("schedule", at)
    assert_clean(at)
    assert {"sched_run", "sched_method", "sched_margin", "sched_cap", "sched_threshold_posthoc", "sched_match"} <= keys(
        at
    )
    assert charts(at) == 1
    assert len(at.get("download_button")) == 1 and {"sched_save", "sched_launch"} <= keys(at)
    assert not at.button(key="sched_save").disabled and not at.button(key="sched_launch").disabled
    stages = frame_with(at, "step", "frozen")
    assert list(stages["step"]) == [4, 8]  # blocks 0 and 1 converge at 4 and 8 in the synthetic truth
    # the run has time_model.json: the time saving says it comes from measured step times
    assert any(m.label == "Predicted time saving (measured)" for m in at.metric)
    assert any("from measured step times" in c.value for c in at.caption)
    at.slider(key="sched_cap").set_value(1).run()
    assert list(frame_with(at, "step", "frozen")["frozen"]) == [1]

    at.button(key="sched_save").click().run()
    assert_clean(at)
    saved = io.load_schedule(env.synthetic, env.uri, io.DERIVED_SCHEDULE_ARTIFACT)
    assert saved["stages"] == [{"step": 4, "frozen": 1}] and saved["source"]["run_id"] == env.synthetic

    at.button(key="sched_launch").click().run()  # a twin of the source: 12 steps of a 4-block model
    assert_clean(at)
    from app import jobs

    job = jobs.list_jobs()[0]
    assert job.source == "schedule" and f"layerlock.schedule_source={env.synthetic}" in job.argv
    # The child gets a config the trainer accepts: the source's 4-block, 12-step geometry and the file.
    from analysis.schedule import validate_schedule
    from core.config import load_config

    sets = [job.argv[i + 1] for i, a in enumerate(job.argv) if a == "--set"]
    cfg = load_config(job.argv[job.argv.index("--config") + 1], sets)
    assert (cfg.model.depth, cfg.train.steps, cfg.objective.name) == (4, 12, "layerlock")
    validate_schedule(json.loads(Path(cfg.freeze.schedule).read_text()), total_steps=12, n_blocks=4)
    jobs.cancel(job, grace_s=10)  # training it is the launch test's job; here the argv is what matters
    assert jobs.status(job) == "cancelled"


def test_compare_page(env: Store) -> None:
    at = open_page("compare")
    assert_clean(at)
    chosen = at.multiselect(key="cmp_runs").value
    assert env.real in chosen and env.synthetic in chosen  # default: recent runs, one per method
    assert {"cmp_x", "cmp_loss", "cmp_smooth", "cmp_block_metric"} <= keys(at)
    assert charts(at) >= 4
    table = frame_with(at, "run", "flop_saving")
    assert set(table["method"]) >= {"mae", "layerlock"} and "eval/digit/acc" in table.columns
    for axis in ("FLOPs", "wall time"):
        at.radio(key="cmp_x").set_value(axis).run()
        assert_clean(at)
    assert "feat_std_min" in table.columns
    n = charts(at)
    at.radio(key="cmp_collapse_metric").set_value("eff_rank").run()
    assert_clean(at)
    assert charts(at) == n
    at.multiselect(key="cmp_runs").set_value([]).run()  # nothing chosen: back to the recent runs
    assert_clean(at)
    assert at.multiselect(key="cmp_runs").value == chosen and charts(at) >= 4


def test_freeze_test_page(env: Store) -> None:
    at = open_page("freeze_test")
    assert_clean(at)
    assert at.selectbox(key="ft_parent").value == env.real
    assert charts(at) == 2
    assert at.slider(key="ft_tol").value == pytest.approx(0.02)  # one seed: the uncalibrated default, 2%
    assert len(frame_with(at, "L", "T")) == len(env.children)
    # One seed only: the default tolerance, saying it is not calibrated; rules marked on the grid.
    assert any("not calibrated: no seed group of the baseline" in c.value for c in at.caption)
    agreement = frame_with(at, "L used", "freeze test", "posthoc", "online", "gradnorm")
    assert agreement["block"].tolist() == [0, 1, 2, 3]
    assert set(frame_with(at, "rule", "spearman", "kendall")["rule"]) == {"posthoc", "online", "gradnorm"}
    traces = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert traces[0]["type"] == "heatmap" and {t.get("name") for t in traces[1:]} <= {"posthoc", "online", "gradnorm"}
    at.slider(key="ft_tol").set_value(0.1).run()
    assert_clean(at)
    assert any("set on the slider" in c.value for c in at.caption)


def test_attribution_page(env: Store) -> None:
    at = open_page("attribution")
    assert_clean(at)
    assert at.selectbox(key="attr_run").value == env.real
    assert {"attr_task", "attr_method", "attr_clip", "attr_steps"} <= keys(at)
    assert charts(at) == 3
    at.selectbox(key="attr_method").set_value("layer_ig").run()
    assert_clean(at)
    assert charts(at) == 3
    at.selectbox(key="attr_run").set_value(env.synthetic).run()  # no checkpoints: a warning
    assert_clean(at)
    assert any("checkpoints" in w.value for w in at.warning)


@pytest.mark.system
def test_launch_page_starts_a_run_that_appears_on_runs(env: Store) -> None:
    from app import jobs
    from core.schema import TAG_JOB

    at = open_page("launch")
    assert_clean(at)
    assert {
        "launch_config",
        "launch_objective",
        "launch_steps",
        "launch_seed",
        "launch_data",
        "launch_schedule",
        "launch_overrides",
        "launch_submit",
    } <= keys(at)
    tiny = [
        "model.depth=2",
        "model.dim=24",
        "model.heads=2",
        "model.decoder_dim=16",
        "model.decoder_heads=2",
        "data.frames=4",
        "data.size=16",
        "data.train_clips=16",
        "data.val_clips=8",
        "probe.batch_size=8",
        "probe.every=2",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.checkpoint_every=4",
    ]
    at.selectbox(key="launch_config").set_value("experiments/configs/mae_tiny.yaml")
    at.number_input(key="launch_steps").set_value(4)
    at.number_input(key="launch_seed").set_value(3)
    at.text_area(key="launch_overrides").input("\n".join(tiny))
    at.button(key="launch_submit").click().run()
    assert_clean(at)
    assert any("Started" in s.value for s in at.success), [w.value for w in at.warning]
    job = jobs.list_jobs()[0]
    assert job.argv[:4] == [sys.executable, "-m", "experiments", "pretrain"] and "train.steps=4" in job.argv

    rc = jobs.wait(job, timeout=240)
    assert rc == 0, jobs.tail(job.log_path)
    assert jobs.status(job) == "finished" and jobs.run_id(job)
    record = io.get_run(jobs.run_id(job), env.uri)
    assert record.status == "FINISHED" and record.name == job.run_name and record.param_int("train.seed") == 3
    assert record.tags[TAG_JOB] == job.job_id  # how the Launch page found it

    at.run()  # the finished job shows its run; the Runs page lists it
    assert_clean(at)
    assert any(jobs.run_id(job) in s.value for s in at.success)
    at = open_page("runs", at)
    assert jobs.run_id(job) in set(at.dataframe[0].value["run_id"])


@pytest.mark.system
def test_launch_rejects_bad_input_and_cancels(env: Store) -> None:
    from app import jobs

    at = open_page("launch")
    at.text_area(key="launch_overrides").input("model.depthh=3")
    at.button(key="launch_submit").click().run()
    assert_clean(at)
    assert any("unknown config key 'model.depthh'" in w.value for w in at.warning)
    assert not jobs.list_jobs()

    at.text_area(key="launch_overrides").input("")
    at.button(key="launch_submit").click().run()  # mae_tiny as is: cancelled long before it ends
    job = jobs.list_jobs()[0]
    at.button(key=f"launch_cancel_{job.job_id}").click().run()
    assert_clean(at)
    job = jobs.Job.load(job.meta_path)  # as the page saved it: marked cancelled
    assert jobs.status(job) == "cancelled" and not jobs.is_running(job)


def test_empty_store_shows_a_message_on_every_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point_app_at(f"sqlite:///{tmp_path}/none.db", tmp_path, monkeypatch)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.run()
    for page in PAGES:
        at = open_page(page, at)
        assert_clean(at)
        assert at.info or at.warning, page
        assert charts(at) == 0, page
    assert not (tmp_path / "none.db").exists()  # looking did not create a store


def test_sidebar_uri_switches_the_store(env: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv("LAYERLOCK_TRACKING_URIS", other)  # the operator offers a second store
    at = open_page("runs")
    assert at.dataframe
    assert at.selectbox(key="sidebar_uri").options == [env.uri, other, "sqlite:///mlflow.db"]
    at.selectbox(key="sidebar_uri").select(other).run()
    assert_clean(at)
    assert any("No runs in the tracking store" in i.value for i in at.info) and not at.dataframe


def test_sidebar_offers_only_configured_uris(env: Store, tmp_path: Path) -> None:
    from app.views import state

    at = open_page("runs")
    assert at.selectbox(key="sidebar_uri").options == [env.uri, "sqlite:///mlflow.db"]
    assert state.allowed_uris(["--tracking-uri", "http://team:5000"])[-2:] == [
        "http://team:5000",
        "sqlite:///mlflow.db",
    ]
    # a value forced into the session (no widget offers it) is refused; the store stays put
    at.session_state["tracking_uri"] = "http://attacker.example:80"
    at.run()
    assert_clean(at)
    assert at.selectbox(key="sidebar_uri").value == env.uri and at.dataframe


def test_job_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app import jobs

    monkeypatch.setenv("LAYERLOCK_RUNS_DIR", str(tmp_path))
    assert jobs.override_lines("a.b=1\n\n# note\n c=x y \n") == ["a.b=1", "c=x y"]
    with pytest.raises(ValueError, match="line 1"):
        jobs.override_lines("nonsense")
    # the child runs in the repository root: a relative sqlite file is made absolute, a server URI kept
    argv = jobs.pretrain_argv("c.yaml", tracking_uri="sqlite:///mlflow.db")
    assert argv[-2:] == ["--tracking-uri", f"sqlite:///{Path('mlflow.db').resolve()}"]
    assert jobs.pretrain_argv("c.yaml", tracking_uri="http://h:5000")[-1] == "http://h:5000"
    assert jobs.twin_overrides(
        {"model.depth": "4", "data.root": "None", "objective.name": "pixel", "train.lr": "0.0015"}
    ) == ["model.depth=4", "train.lr=0.0015"]
    log = tmp_path / "x.log"
    log.write_text("start\nmae 1a: 10%|#  | 1/10\rmae 1a: 50%|#####  | 5/10\rmae 1a: 100%|###| 10/10\ndone\n")
    assert jobs.tail(log) == "start\nmae 1a: 100%|###| 10/10\ndone"
