"""Nothing lost, nobody let in: a tracking store that goes away mid-run (a killed MLflow server on
PostgreSQL, a locked sqlite file), a kill inside a checkpoint write, a spool left for
``experiments sync``, a second trainer of a live run, probe storage per checkpoint."""

from __future__ import annotations

import glob
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import core.tracking as tracking
import core.train as core_train
from core import schema
from core.config import ExperimentConfig
from core.errors import LayerLockError
from core.tracking.sender import SENDER_ENV
from core.train import load_run_checkpoint, train
from tests.helpers import ROOT, TeamServer, run_cli, tiny_dict, tiny_sets

FAULTS = str(ROOT / "tests" / "pretrain_with_faults.py")
# Every test here starts processes: trainers, an mlflow server on PostgreSQL, or (the autouse fixture
# below) the sender process every run sends from.
pytestmark = pytest.mark.system


def _env(runs: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        tracking.RUNS_ENV: str(runs),
        SENDER_ENV: "process",
    }


@pytest.fixture(autouse=True)
def sender_process(monkeypatch):
    """Here runs send from the default sender process (conftest.py chooses threads elsewhere)."""
    monkeypatch.setenv(SENDER_ENV, "process")


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _logged_keys(client: MlflowClient, run_id: str) -> list[str]:
    """``train/loss`` and every per-block key of a run."""
    keys = client.get_run(run_id).data.metrics
    return [schema.LOSS, *sorted(k for k in keys if "/block_" in k and not k.startswith(schema.EVAL))]


# ----------------------------------------------------------------------------- must-show: a killed server


@pytest.fixture(scope="module")
def team():
    server = TeamServer().start()
    yield server
    server.stop()


def test_killed_server_on_postgres_loses_nothing_and_training_does_not_stall(team, tmp_path):
    """A real ``mlflow server`` on PostgreSQL is SIGKILLed mid-run and brought back only after
    MLflow's bounded retries (about 15 s) have given up: the run takes at most its outage-free
    time plus a minute, every step of every key is stored exactly once, the run is FINISHED."""
    sets = tiny_sets(**{"train.steps": 80, "train.checkpoint_every": 10, "probe.every": 10})
    cmd = [
        sys.executable,
        FAULTS,
        "--slow",
        "0.6",
        "--config",
        "experiments/configs/mae_tiny.yaml",
        *sets,
        "--tracking-uri",
        team.uri,
    ]

    started = time.monotonic()
    base = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "base"), capture_output=True, text=True, timeout=600)
    outage_free_s = time.monotonic() - started
    assert base.returncode == 0, base.stderr[-3000:]

    runs = tmp_path / "outage"
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(runs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = started + 300
    while not glob.glob(str(runs / "*" / "checkpoints" / "step_000010.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    team.kill()
    killed_at = time.monotonic()
    time.sleep(20)  # down for longer than MLflow's ~15 s of retries (plus the restart)
    team.start_mlflow()
    back_at = time.monotonic()
    try:  # the training does not stall: done within its outage-free time plus a minute
        out, err = proc.communicate(timeout=max(started + outage_free_s + 60 - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(
            f"the run was not done {outage_free_s + 60:.0f} s after its start (outage-free: "
            f"{outage_free_s:.0f} s): the outage stalled it"
        )
    with_outage_s = time.monotonic() - started
    assert proc.returncode == 0, err[-3000:]
    assert "does not answer" in err and "answers again" in err, err[-3000:]  # the spool carried the outage
    assert "Traceback" not in err, err[-3000:]

    client = MlflowClient(team.uri)
    run_id, ref = out.strip().splitlines()[-1], base.stdout.strip().splitlines()[-1]
    assert client.get_run(run_id).info.status == "FINISHED"
    keys = _logged_keys(client, ref)
    assert len(keys) == 1 + len(schema.BLOCK_METRICS) * 4 and keys == _logged_keys(client, run_id)
    counts = {}
    for key in keys:
        steps = _steps(client, run_id, key)
        assert steps == _steps(client, ref, key), key  # every step present, exactly once
        counts[key] = len(steps)
    stored = {f.path for f in client.list_artifacts(run_id, schema.CHECKPOINT_DIR)}
    assert stored == {schema.checkpoint_artifact(s) for s in range(10, 81, 10)}
    assert not (runs / run_id).exists()  # everything sent: the local folder is gone
    print(
        f"\noutage-free {outage_free_s:.1f} s, with the server killed for {back_at - killed_at:.1f} s: "
        f"{with_outage_s:.1f} s; steps stored once: train/loss {counts[schema.LOSS]}, "
        f"{len(counts) - 1} per-block keys {min(counts.values())}-{max(counts.values())} each"
    )


# ----------------------------------------------------------------------------- a locked sqlite store


def test_sqlite_store_locked_by_another_writer_loses_nothing(tmp_path, store, monkeypatch, capfd):
    """A second writer holds an exclusive lock on the sqlite file for 25 s (longer than sqlite's
    20 s busy timeout) from step 6 on; training goes on and nothing is lost. (capfd: the sender
    process warns on the same stderr.)"""
    db, holder = str(tmp_path / "mlflow.db"), {}

    def hold_lock() -> None:
        con = sqlite3.connect(db, timeout=60)
        con.execute("BEGIN EXCLUSIVE")
        time.sleep(25)
        con.rollback()
        con.close()

    real = core_train._Run.update

    def slowed(self, step, *args, **kwargs):
        if step == 6 and not holder:
            holder["t"] = threading.Thread(target=hold_lock)
            holder["t"].start()
        if kwargs.get("log_now", True):  # training steps, not the time calibration's
            time.sleep(0.5)
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(core_train._Run, "update", slowed)
    cfg = ExperimentConfig.model_validate(
        tiny_dict(train={"steps": 60, "checkpoint_every": 10, "log_every": 1}, probe={"every": 10})
    )
    result = train(cfg, tracking_uri=store, progress=False)
    holder["t"].join()
    err = capfd.readouterr().err
    assert "does not answer" in err and "database is locked" in err and "answers again" in err, err[-2000:]
    client = MlflowClient(store)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert _steps(client, result.run_id, schema.LOSS) == list(range(60))
    for key in _logged_keys(client, result.run_id)[1:]:
        steps = _steps(client, result.run_id, key)
        assert len(steps) == len(set(steps)), key
    assert _steps(client, result.run_id, "cka_prev/block_02") == list(range(0, 61, 10))
    assert _steps(client, result.run_id, "grad_norm/block_01") == list(range(60))


# ----------------------------------------------------------------------------- a kill inside a checkpoint write


def test_sigkill_during_a_checkpoint_write_then_evaluate_and_resume(tmp_path, store, monkeypatch):
    from experiments.evaluate import evaluate_run, load_run_encoder

    runs = tmp_path / "runs"
    monkeypatch.setenv(tracking.RUNS_ENV, str(runs))
    proc = subprocess.run(
        [
            sys.executable,
            FAULTS,
            "--kill-in-checkpoint",
            "8",
            "--config",
            "experiments/configs/mae_tiny.yaml",
            *tiny_sets(),
            "--tracking-uri",
            store,
        ],
        cwd=ROOT,
        env=_env(runs),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    (run_id,) = [p.name for p in runs.iterdir()]
    folder = runs / run_id
    assert sorted(p.name for p in (folder / "checkpoints").glob("step_*.pt")) == ["step_000004.pt"]
    assert list((folder / "checkpoints").glob(".step_000008.pt.*.tmp"))  # the half-written file, never published

    _, _, step = load_run_encoder(run_id, store, device="cpu")
    assert step == 4
    metrics = evaluate_run(
        run_id, tasks=["digit"], tracking_uri=store, probe="linear", train_clips=16, val_clips=8, progress=False
    )
    assert metrics and all(v == v for v in metrics.values())

    resumed = run_cli("-m", "experiments", "pretrain", "--resume", run_id, "--tracking-uri", store)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    client = MlflowClient(store)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _steps(client, run_id, schema.LOSS) == [0, 1, 3, 5, 7, 9, 11]
    assert _steps(client, run_id, "cka_prev/block_00") == [0, 4, 8, 12]
    assert load_run_checkpoint(run_id, tracking_uri=store)["step"] == 12


# ----------------------------------------------------------------------------- the sender process

_TRAINER = """
import os, sys, time
from core.tracking import Tracker
t = Tracker(uri=sys.argv[1], experiment="sender")
t.log_metrics({"m": 1.0}, 0)
assert t.flush(30)
t.log_metrics({"m": 2.0}, 1)
t.submit(force=True)
t._sender.proc.send_signal(2)          # a Ctrl-C meant for the trainer reaches its group
print(t.run_id, t._sender.proc.pid, flush=True)
time.sleep(600)
"""


def test_the_sender_is_a_process_of_its_own_and_ends_with_its_trainer(tmp_path, store):
    """MLflow's store calls run in a process of its own (in a thread they take the training
    loop's interpreter lock: bench monitor). It shrugs off SIGINT, sends what was logged, and
    when the trainer is killed it leaves too, without sending, so the spool keeps what is left
    for ``sync`` (as after a kill of a trainer with a sender thread)."""
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, store],
        cwd=ROOT,
        env=_env(runs),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_id, sender_pid = proc.stdout.readline().split()
    sender_pid = int(sender_pid)
    assert sender_pid not in (proc.pid, os.getpid())
    client = MlflowClient(store)
    deadline = time.monotonic() + 60
    while _steps(client, run_id, "m") != [0, 1] and time.monotonic() < deadline:  # sent after the SIGINT too
        time.sleep(0.2)
    assert _steps(client, run_id, "m") == [0, 1]
    os.kill(sender_pid, 0)  # still there: SIGINT is the trainer's business

    tracker_folder = runs / run_id
    with open(tracker_folder / tracking.SPOOL_FILE, "ab") as f:  # a line the sender has not seen yet
        f.write(b'{"op":"metrics","m":[["m",3.0,1,2]]}\n')
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(sender_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the sender process outlived its trainer")
    assert _steps(client, run_id, "m") == [0, 1]  # the unseen line waits in the spool ...
    assert run_cli("-m", "experiments", "sync", run_id, env=_env(runs)).returncode == 0
    assert _steps(client, run_id, "m") == [0, 1, 2]  # ... for sync


def test_the_sender_process_is_the_module_entry_point(store, capfd):
    """The sender process runs ``python -m core.tracking.sender`` (the module, not code pasted into
    ``python -c``), without the warning ``runpy`` gives for a module its package imported already;
    a tracker used in ``with`` ends its run FINISHED once everything is sent."""
    with tracking.Tracker(uri=store, experiment="entry") as t:
        args = t._sender.proc.args
        t.log_metrics({"m": 1.0}, 0)
    assert args[1:3] == ["-m", "core.tracking.sender"] and args[3:5] == [store, t.run_id]
    client = MlflowClient(store)
    assert _steps(client, t.run_id, "m") == [0] and client.get_run(t.run_id).info.status == "FINISHED"
    assert "RuntimeWarning" not in capfd.readouterr().err


def test_a_relative_sqlite_uri_names_the_callers_store_from_outside_the_repo(tmp_path, monkeypatch):
    """The sender process runs in the repo root: a relative ``sqlite:///mlflow.db`` given in another
    folder (Lightning's ``MLFlowLogger`` as the examples set it up) must still reach that folder's store."""
    monkeypatch.chdir(tmp_path)
    with tracking.Tracker(uri="sqlite:///outside.db", experiment="outside") as t:
        t.log_metrics({"m": 1.0}, 0)
    assert not (ROOT / "outside.db").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'outside.db'}")
    assert _steps(client, t.run_id, "m") == [0] and client.get_run(t.run_id).info.status == "FINISHED"


def test_a_bad_sender_setting_fails_before_any_run_exists(store, monkeypatch):
    monkeypatch.setenv(SENDER_ENV, "fork")
    with pytest.raises(LayerLockError, match="LAYERLOCK_SENDER='fork': use 'process' or 'thread'"):
        tracking.Tracker(uri=store, experiment="bad-sender")
    assert MlflowClient(store).get_experiment_by_name("bad-sender") is None


# ----------------------------------------------------------------------------- sync


def test_spool_left_behind_is_sent_by_sync(tmp_path, store, monkeypatch, capsys):
    """The store takes nothing during the whole run (and the run's end waits only 1 s): every
    metric, upload and the FINISHED status wait in the spool until ``experiments sync`` sends them."""

    def refuse(*args, **kwargs):
        raise OSError("store away")

    monkeypatch.setenv(tracking.RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(SENDER_ENV, "thread")  # the patched send is this process's
    monkeypatch.setattr(tracking.store, "send", refuse)
    monkeypatch.setattr(tracking.tracker, "END_WAIT_S", 1.0)
    result = train(ExperimentConfig.model_validate(tiny_dict()), tracking_uri=store, progress=False)
    err = capsys.readouterr().err
    assert f"python -m experiments sync {result.run_id}" in err, err[-2000:]
    client = MlflowClient(store)
    assert client.get_run(result.run_id).info.status == "RUNNING"
    assert not client.get_metric_history(result.run_id, schema.LOSS)

    proc = run_cli("-m", "experiments", "sync", result.run_id)
    assert proc.returncode == 0 and "status FINISHED" in proc.stderr, proc.stderr[-2000:]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert _steps(client, result.run_id, schema.LOSS) == [0, 1, 3, 5, 7, 9, 11]
    names = {f.path for f in client.list_artifacts(result.run_id)}
    assert {schema.CONFIG_ARTIFACT, schema.LAYER_METRICS_ARTIFACT, schema.CHECKPOINT_DIR, schema.PROBE_DIR} <= names
    assert not tracking.local_dir(result.run_id).exists()
    again = run_cli("-m", "experiments", "sync")
    assert again.returncode == 0 and "nothing waiting" in again.stderr, again.stderr


# ----------------------------------------------------------------------------- one trainer per run


def test_second_live_trainer_is_refused_and_a_stale_one_is_not(store):
    import socket

    cfg = ExperimentConfig.model_validate(tiny_dict())
    first = train(cfg, tracking_uri=store, progress=False, stop_after=4)  # RUNNING, checkpoint at 4
    client = MlflowClient(store)
    here = socket.gethostname()
    for owner in (f"{here} pid 1", "otherhost pid 4242"):  # alive here (init); elsewhere, fresh heartbeat
        client.set_tag(first.run_id, schema.TAG_OWNER, owner)
        client.set_tag(first.run_id, schema.TAG_HEARTBEAT, f"{time.time():.0f}")
        with pytest.raises(LayerLockError, match=f"is being trained by {owner}"):
            train(cfg, tracking_uri=store, resume_run_id=first.run_id, progress=False)
    client.set_tag(first.run_id, schema.TAG_HEARTBEAT, f"{time.time() - tracking.STALE_S - 1:.0f}")
    done = train(cfg, tracking_uri=store, resume_run_id=first.run_id, progress=False)
    assert done.steps == 12 and client.get_run(first.run_id).info.status == "FINISHED"
    tags = client.get_run(first.run_id).data.tags
    assert tags[schema.TAG_OWNER] == f"{here} pid {os.getpid()}"


# ----------------------------------------------------------------------------- probe storage


def test_checkpoints_do_not_carry_probe_features(tmp_path, store):
    """Each probe's features are stored once (probe/step_NNNNNN.pt); a checkpoint keeps the probe
    steps only, so its size does not grow with the probes taken before it."""
    cfg = ExperimentConfig.model_validate(tiny_dict(probe={"every": 2, "batch_size": 16, "tokens_per_clip": 16}))
    result = train(cfg, tracking_uri=store, progress=False)
    client = MlflowClient(store)
    probes = sorted(f.path for f in client.list_artifacts(result.run_id, schema.PROBE_DIR))
    assert probes == [schema.probe_artifact(s) for s in range(0, 13, 2)]
    one_probe = 4 * 16 * 16 * 24 * 2  # blocks x clips x positions x dim x bf16
    files = {
        schema.checkpoint_step(p): Path(p)
        for p in glob.glob(
            str(tmp_path / "mlartifacts" / "**" / result.run_id / "**" / "checkpoints" / "step_*.pt"), recursive=True
        )
    }
    assert sorted(files) == [4, 8, 12]
    assert files[12].stat().st_size - files[4].stat().st_size < one_probe / 2
    state = torch.load(files[12], map_location="cpu", weights_only=True)["probe"]
    assert set(state) == {"steps", "positions"} and state["steps"] == [0, 2, 4, 6, 8, 10]
