"""The dashboard is safe wherever it is started: loopback only (from any working directory),
no page beyond it without the operator's opt-in, XSRF protection on."""

from __future__ import annotations

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
from tests.helpers import HOME, TIMEOUT, point_app_at

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


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc")
def test_streamlit_started_from_another_folder_listens_only_on_loopback(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "Home.py"),
                             "--server.port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not _listeners(port) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        listening = _listeners(port)
        assert listening, "the dashboard did not start listening within 90 s"
        assert listening == {"0100007F"}, listening   # 127.0.0.1 only: no 0.0.0.0, no ::
        out = subprocess.run([sys.executable, "-c", "import streamlit.config as c, sys; "
                              "sys.argv=['x']; print(c.get_option('server.enableXsrfProtection'))"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "True"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    assert not at.sidebar.selectbox   # nothing else was drawn

    monkeypatch.setenv(serving.ALLOW_REMOTE_ENV, "1")
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    assert not at.exception and not at.error
    assert at.selectbox(key="sidebar_uri")
