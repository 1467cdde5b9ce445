"""The dashboard is safe wherever it is started: loopback only (from any working directory),
no page beyond it without the operator's opt-in, XSRF protection on."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from app.views import serving
from tests.helpers import HOME, TIMEOUT, point_app_at, stop_process

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listeners(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) in LISTEN state on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            addr, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


@pytest.mark.system
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc")
def test_streamlit_started_from_another_folder_listens_only_on_loopback(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "Home.py"), "--server.port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 90
        while not _listeners(port) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        listening = _listeners(port)
        assert listening, "the dashboard did not start listening within 90 s"
        assert listening == {"0100007F"}, listening  # 127.0.0.1 only: no 0.0.0.0, no ::
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import streamlit.config as c, sys; sys.argv=['x']; print(c.get_option('server.enableXsrfProtection'))",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout.strip() == "True"
    finally:
        stop_process(proc, timeout=20)


def test_refusal_rules():
    assert serving.refusal("127.0.0.1", True, {}) is None
    assert serving.refusal("::1", True, {}) is None and serving.refusal("localhost", True, {}) is None
    assert "no login" in serving.refusal("0.0.0.0", True, {})
    assert "every interface" in serving.refusal("", True, {})
    assert serving.refusal("0.0.0.0", True, {serving.ALLOW_REMOTE_ENV: "1"}) is None
    assert "XSRF" in serving.refusal("127.0.0.1", False, {serving.ALLOW_REMOTE_ENV: "1"})


@pytest.fixture
def remote_address():
    before = st_config.get_option("server.address")
    st_config.set_option("server.address", "0.0.0.0")
    yield
    st_config.set_option("server.address", before)


def test_dashboard_refuses_to_serve_beyond_loopback_without_opt_in(remote_address, tmp_path, monkeypatch):
    point_app_at(f"sqlite:///{tmp_path}/m.db", tmp_path, monkeypatch)
    monkeypatch.delenv(serving.ALLOW_REMOTE_ENV, raising=False)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert [e.value for e in at.error] and "no login" in at.error[0].value
    assert not at.sidebar.selectbox  # nothing else was drawn

    monkeypatch.setenv(serving.ALLOW_REMOTE_ENV, "1")
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    assert not at.exception and not at.error
    assert at.selectbox(key="sidebar_uri")


# ----------------------------------------------------------------------------- launcher


@pytest.mark.system
def test_a_stored_pid_is_trusted_only_when_it_is_the_jobs_process(tmp_path, monkeypatch):
    from app import jobs

    monkeypatch.setenv("LAYERLOCK_RUNS_DIR", str(tmp_path))
    jobs.launch_dir().mkdir(parents=True)
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    other = subprocess.Popen(argv)  # stands in for a process that got a job's pid after a restart
    try:
        deadline = time.monotonic() + 30  # until the child has exec'd: before that its cmdline is pytest's
        while Path(f"/proc/{other.pid}/cmdline").read_bytes().split(b"\0")[:3] != [a.encode() for a in argv]:
            assert time.monotonic() < deadline, "the stand-in process never started"
            time.sleep(0.01)

        def job(**kw) -> jobs.Job:
            fields = dict(
                job_id="j",
                argv=argv,
                pid=other.pid,
                run_name="r",
                tracking_uri="sqlite:///x.db",
                started=time.time(),
                pid_start=jobs._start_time(other.pid),
            )
            return jobs.Job(**{**fields, **kw})

        assert jobs.is_running(job())  # same command line, same start time: the job's own child
        for bad in (
            job(pid=0),
            job(pid=-1),
            job(pid=1),
            job(argv=[*argv, "x"]),
            job(pid_start=12345),
            job(pid_start=None),
        ):
            assert not jobs.is_running(bad)
            assert jobs.cancel(bad, grace_s=0.2) == "not running"
        assert other.poll() is None  # never signalled
        saved = job(job_id="k")
        saved.save()
        assert sorted(p.name for p in jobs.launch_dir().iterdir()) == ["j.json", "k.json"]  # no temporaries
        assert jobs.Job.load(saved.meta_path) == saved
    finally:
        other.kill()
        other.wait()


@pytest.mark.system
def test_launch_page_caps_jobs_and_keeps_text_fields_as_strings(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from analysis import load_config, schema
    from app import jobs

    point_app_at(f"sqlite:///{tmp_path}/m.db", tmp_path, monkeypatch)
    monkeypatch.setenv(jobs.MAX_JOBS_ENV, "1")
    seen: list[list[str]] = []

    def sleeper(config, overrides=None, tags=None, tracking_uri=None):  # no training on a shared CPU
        seen.append(list(overrides or []))
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    monkeypatch.setattr(jobs, "pretrain_argv", sleeper)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    at.switch_page("screens/launch.py").run()
    at.text_input(key="launch_run_name").input("exp #2")
    at.button(key="launch_submit").click().run()
    assert not at.exception
    assert any("Started exp #2" in s.value for s in at.success), [w.value for w in at.warning]
    started = jobs.list_jobs()
    try:
        assert len(started) == 1 and started[0].run_name == "exp #2"
        assert 'tracking.run_name="exp #2"' in seen[0]
        assert load_config(ROOT / "experiments/configs/mae_tiny.yaml", seen[0]).tracking.run_name == "exp #2"
        # The job finds its run by the job-id tag the launcher adds, whatever the run is named.
        job = started[0]
        assert job.argv[-2:] == ["--tag", f"{schema.TAG_JOB}={job.job_id}"]
        client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
        exp = client.create_experiment("layerlock")
        client.create_run(exp, run_name="exp #2")  # same name, not this job's
        rid = client.create_run(exp, run_name="renamed", tags={schema.TAG_JOB: job.job_id}).info.run_id
        at.button(key="launch_refresh").click().run()
        assert any(rid in c.value for c in at.caption), [c.value for c in at.caption]

        at.text_input(key="launch_run_name").input("second")
        at.button(key="launch_submit").click().run()
        assert not at.exception
        assert any("at most 1" in w.value for w in at.warning), [w.value for w in at.warning]
        assert len(jobs.list_jobs()) == 1
    finally:
        for job in jobs.list_jobs():
            jobs.cancel(job, grace_s=2)


# The dashboard's half of the bad-input table (README, "Bad input: what you get"): launch-page
# fields and the one warning each gets; nothing is started.
DASHBOARD_ROWS: list[tuple[str, dict[str, str], str]] = [
    (
        "override-without-equals",
        {"launch_overrides": "nonsense"},
        "Not started: override line 1: expected key=value, got 'nonsense'",
    ),
    (
        "override-unknown-key",
        {"launch_overrides": "model.depthh=3"},
        "Not started: {cfg} (with --set): unknown config key 'model.depthh'",
    ),
    (
        "override-seed-too-large",
        {"launch_overrides": "train.seed=10000000000000000000000"},
        "Not started: {cfg} (with --set): train.seed: Input should be less than or equal to 2147483647",
    ),
    (
        "override-infinite",
        {"launch_overrides": "train.lr=.inf"},
        "Not started: {cfg} (with --set): train.lr: Input should be a finite number",
    ),
    (
        "custom-schedule-empty",
        {"launch_schedule": "custom path…"},
        "Not started: custom schedule: enter the path of a schedule JSON file",
    ),
    (
        "custom-schedule-binary",
        {"launch_schedule": "custom path…", "launch_schedule_path": "/bin/ls"},
        "Not started: ls: not a text file (a schedule is JSON text)",
    ),
    (
        "custom-schedule-missing",
        {"launch_schedule": "custom path…", "launch_schedule_path": "/nonexistent.json"},
        "Not started: schedule file not found: /nonexistent.json",
    ),
]


@pytest.mark.parametrize("fields, message", [r[1:] for r in DASHBOARD_ROWS], ids=[r[0] for r in DASHBOARD_ROWS])
def test_launch_field_gets_one_warning_and_starts_nothing(fields, message, tmp_path, monkeypatch):
    from app import jobs

    point_app_at(f"sqlite:///{tmp_path}/m.db", tmp_path, monkeypatch)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    at.switch_page("screens/launch.py").run()
    for key, value in fields.items():
        widget = (
            at.selectbox(key=key)
            if key == "launch_schedule"
            else (at.text_area(key=key) if key == "launch_overrides" else at.text_input(key=key))
        )
        widget.set_value(value)
    at.button(key="launch_submit").click().run()
    assert not at.exception and not at.error
    cfg = str(ROOT / "experiments" / "configs" / "mae_tiny.yaml")
    assert [w.value for w in at.warning] == [message.format(cfg=cfg)]
    assert not jobs.list_jobs()


def dashboard_readme_row(fields: dict[str, str], message: str) -> str:
    """How a dashboard row reads in README.md."""
    shown = ", ".join(f"`{k}` = `{v}`" for k, v in fields.items())
    return f"| {shown} | `{message.format(cfg='CONFIG')}` |"


def test_readme_lists_every_dashboard_row():
    readme = (ROOT / "README.md").read_text()
    for row_id, fields, message in DASHBOARD_ROWS:
        assert dashboard_readme_row(fields, message) in readme, row_id


def _fragment_that_fails() -> None:
    """An AppTest script: an auto-refreshing fragment whose body raises."""
    from app.views import errors

    def tick() -> None:
        raise ZeroDivisionError("division by zero")

    errors.fragment(tick, run_every=60)()


def test_auto_refreshing_fragments_show_one_line_not_a_traceback():
    at = AppTest.from_function(_fragment_that_fails, default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] == [
        "This page could not be drawn (ZeroDivisionError: division by zero). The server log has the details."
    ]
    # Every fragment of the dashboard is made by errors.fragment (its timed reruns skip Home.py's handler).
    errors_py = ROOT / "app" / "views" / "errors.py"
    assert _direct_fragments(errors_py)  # the scan sees the one place that may use st.fragment
    direct = {
        str(p.relative_to(ROOT)): lines
        for p in (ROOT / "app").rglob("*.py")
        if p != errors_py and (lines := _direct_fragments(p))
    }
    assert direct == {}


def _direct_fragments(path: Path) -> list[int]:
    """Lines where a file uses Streamlit's own fragment: ``st.fragment`` called, as a decorator or
    passed on, or ``from streamlit import fragment``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "fragment"
            and isinstance(node.value, ast.Name)
            and node.value.id in ("st", "streamlit")
        ):
            found.append(node.lineno)
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module == "streamlit"
            and any(alias.name == "fragment" for alias in node.names)
        ):
            found.append(node.lineno)
    return sorted(found)


def test_the_fragment_scan_sees_every_form(tmp_path):
    src = tmp_path / "page.py"
    src.write_text(
        "import streamlit as st\n@st.fragment\ndef a():\n    pass\n"
        "st.fragment(run_every=2)(a)\nfrom streamlit import fragment\nerrors.fragment(a)()\n"
    )
    assert _direct_fragments(src) == [2, 5, 6]
