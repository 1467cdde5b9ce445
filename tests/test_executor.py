"""experiments.executor: one way to train a set of runs (serial, a local process pool, Ray), with
re-runs that train only what is missing, failures that stop nothing else, and bad options refused."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from core.config import ExperimentConfig
from core.errors import LayerLockError
from core.schema import MLFLOW_PARENT, TAG_FREEZE_BLOCKS, TAG_FREEZE_STEP, TAG_OWNER, TAG_PARENT, TAG_RUN_KEY
from experiments import executor as ex
from experiments.cli import main
from experiments.freeze_test import freeze_test_specs, run_freeze_test
from experiments.seeds import seed_specs
from tests.helpers import ROOT, run_cli, tiny_dict, tiny_sets


def _cfg(**train) -> ExperimentConfig:
    return ExperimentConfig.model_validate(tiny_dict(train={"steps": 8, **train}))


def _children(store: str, parent: str) -> list:
    client = MlflowClient(store)
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`{TAG_PARENT}` = '{parent}'")


def _baseline(store: str, steps: int = 12) -> str:
    from core.train import train

    cfg = _cfg(steps=steps, checkpoint_every=4)
    return train(cfg, tracking_uri=store, progress=False).run_id


# ----------------------------------------------------------------------------- options, keys


def test_key_is_the_sorted_identity_and_specs_of_one_set_differ() -> None:
    specs = seed_specs(_cfg(), [0, 1], {"x": "1"})
    assert specs[0].key != specs[1].key and "train.seed=0" in specs[0].key
    assert (
        specs[0].key
        == ex.RunSpec(
            "other label",
            {},
            {},
            identity={"x": "1", "train.seed": "0", "layerlock.group": specs[0].tags["layerlock.group"]},
        ).key
    )
    assert specs[0].num_gpus == 0
    assert ex.spec_for(ExperimentConfig.model_validate(tiny_dict(train={"device": "cuda"})), "g", {}).num_gpus == 1
    with pytest.raises(LayerLockError, match="one key"):
        ex.run_specs([specs[0], specs[0]], executor="serial", uri="sqlite:///unused.db")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--workers", "0"], "--workers must be at least 1"),
        (["--executor", "nosuch"], "--executor must be one of serial, local, ray"),
        (["--nproc-per-run", "0"], "--nproc-per-run must be at least 1"),
    ],
)
def test_bad_executor_options_exit_2(capsys, args: list[str], needle: str) -> None:
    for command in (
        ["freeze-test", "--baseline", "0" * 32, "--steps", "4", "--blocks", "1"],
        ["pretrain", "--config", "experiments/configs/mae_tiny.yaml", "--seeds", "0,1"],
        ["study", "--seeds", "0"],
        ["demo"],
    ):
        assert main([*command, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {needle}"), err


def test_sqlite_with_a_multi_host_ray_cluster_is_refused(monkeypatch, capsys, store: str) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(
        ray,
        "nodes",
        lambda: [{"NodeManagerAddress": "10.0.0.1", "Alive": True}, {"NodeManagerAddress": "10.0.0.2", "Alive": True}],
    )
    with pytest.raises(LayerLockError, match="spans 2 hosts.*tracking server"):
        ex.connect_ray(None, store)
    assert ex.connect_ray(None, "http://127.0.0.1:5000") is False  # a server: fine
    code = main(
        [
            "pretrain",
            "--config",
            "experiments/configs/mae_tiny.yaml",
            *tiny_sets(),
            "--seeds",
            "0,1",
            "--executor",
            "ray",
            "--tracking-uri",
            store,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: the Ray cluster spans 2 hosts") and "--tracking-uri http" in err[-1]


@pytest.mark.system
def test_ray_without_a_cluster_exits_2_within_30_s(store: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", "auto"):
        proc = run_cli(
            "-m",
            "experiments",
            "pretrain",
            "--config",
            "experiments/configs/mae_tiny.yaml",
            *tiny_sets(),
            "--seeds",
            "0,1",
            "--executor",
            "ray",
            "--ray-address",
            address,
            "--tracking-uri",
            store,
            env={"RAY_ADDRESS": ""},
            timeout=30,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1].startswith("error: no Ray cluster") and "Traceback" not in proc.stderr
    assert not MlflowClient(store).search_runs([e.experiment_id for e in MlflowClient(store).search_experiments()])


@pytest.fixture
def one_torch_thread():
    """Pool and Ray workers train with one torch thread; a serial run in this process matches them
    bit for bit only with one thread too (float sums over two threads run in another order)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- per-run fixed costs


@pytest.mark.system
def test_a_run_of_a_set_gives_the_same_results_with_its_fixed_costs_cut(
    store: str, monkeypatch, one_torch_thread
) -> None:
    """The per-run costs cut for sets of runs (the FLOP model counted once per process, the spool
    sent from a thread of the trainer) change no result: a freeze-test child trained with both cuts
    has the held-out loss, FLOP model and losses of the same child trained cold with a sender
    process, bit for bit. The count cached is the count."""
    import core.train as core_train
    from core.flops import flop_model

    base = _baseline(store, steps=8)
    (child,) = freeze_test_specs(base, [4], [2], store)
    cold_spec = ex.RunSpec(**{**child.__dict__, "tags": {**child.tags, "which": "cold"}})
    monkeypatch.setattr(core_train, "_FLOP_MODELS", {})
    monkeypatch.setenv(ex.SENDER_ENV, "process")
    cold = ex.train_spec(cold_spec, None, store, where="here")
    monkeypatch.delenv(ex.SENDER_ENV)
    assert len(core_train._FLOP_MODELS) == 1  # counted once, now cached for the rest of the set
    warm = ex.train_spec(child, None, store, where="here")
    assert ex.SENDER_ENV not in os.environ  # set only while the run trained
    assert cold.status == warm.status == "FINISHED"
    assert warm.train.heldout_loss == cold.train.heldout_loss and warm.train.final_loss == cold.train.final_loss
    assert warm.train.flops == cold.train.flops
    client = MlflowClient(store)
    hist = [[(m.step, m.value) for m in client.get_metric_history(r.run_id, "train/loss")] for r in (cold, warm)]
    assert hist[0] == hist[1] and hist[0]
    cfg = ExperimentConfig.model_validate(child.config)
    assert core_train._flop_model(cfg) == flop_model(cfg)
    other = ExperimentConfig.model_validate(tiny_dict(train={"batch_size": 2 * cfg.train.batch_size}))
    assert core_train._flop_model(other)["batch_size"] == 2 * cfg.train.batch_size  # another key, counted


# ----------------------------------------------------------------------------- skip-if-done, failures


def test_finished_runs_are_kept_and_a_failing_run_stops_nothing_else(store: str) -> None:
    good = seed_specs(_cfg(), [0, 1])
    no_videos = ExperimentConfig.model_validate(tiny_dict(data={"name": "video_folder", "root": "/nonexistent"}))
    bad = ex.spec_for(no_videos, "bad", {"which": "bad"})
    with pytest.raises(ex.RunsFailed) as caught:
        ex.run_specs([good[0], bad, good[1]], executor="serial", uri=store, progress=False)
    results = caught.value.results
    assert [r.status for r in results] == ["FINISHED", "FAILED", "FINISHED"]
    assert caught.value.failed[0].label == "bad" and caught.value.failed[0].reason
    assert any("run the same command again" in line for line in caught.value.lines())
    again = ex.run_specs(good, executor="serial", uri=store, progress=False)
    assert [r.run_id for r in again] == [results[0].run_id, results[2].run_id] and all(r.reused for r in again)
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    keys = [r.data.tags[TAG_RUN_KEY] for r in runs if r.info.status == "FINISHED"]
    assert sorted(keys) == sorted(s.key for s in good)


@pytest.mark.system
def test_local_pool_gives_the_serial_results_and_loses_no_metric(tmp_path, one_torch_thread) -> None:
    """Three tiny runs, two worker processes writing to one sqlite store at once: every run is there
    once, with the full metric history and the held-out loss of the same run trained serially."""
    serial_store, local_store = (f"sqlite:///{tmp_path}/{n}.db" for n in ("serial", "local"))
    specs = seed_specs(_cfg(steps=10), [0, 1, 2])
    serial = ex.run_specs(specs, executor="serial", uri=serial_store, progress=False)
    local = ex.run_specs(specs, executor="local", workers=2, uri=local_store, progress=False)
    assert [r.train.heldout_loss for r in local] == [r.train.heldout_loss for r in serial]
    client_s, client_l = MlflowClient(serial_store), MlflowClient(local_store)
    runs = client_l.search_runs([e.experiment_id for e in client_l.search_experiments()])
    assert sorted(r.info.run_id for r in runs) == sorted(r.run_id for r in local)  # each once
    for s, loc in zip(serial, local, strict=True):
        metrics = client_s.get_run(s.run_id).data.metrics
        assert set(client_l.get_run(loc.run_id).data.metrics) == set(metrics)
        for key in ("train/loss", "train/frozen_blocks", "cka_prev/block_01"):
            hist_s = [(m.step, m.value) for m in client_s.get_metric_history(s.run_id, key)]
            hist_l = sorted((m.step, m.value) for m in client_l.get_metric_history(loc.run_id, key))
            assert hist_l == sorted(hist_s) and len({st for st, _ in hist_l}) == len(hist_l)


# ----------------------------------------------------------------------------- Ray


@pytest.fixture
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.system
def test_freeze_test_grid_on_a_local_ray_cluster_matches_serial(tmp_path, ray_cluster, one_torch_thread) -> None:
    """The grid through Ray tasks, against the same grid trained serially on a copy of the store
    (the baseline's checkpoints are shared: the copy points at the same artifact folder)."""
    serial_store = f"sqlite:///{tmp_path}/serial.db"
    baseline = _baseline(serial_store)
    shutil.copy(tmp_path / "serial.db", tmp_path / "ray.db")
    ray_store = f"sqlite:///{tmp_path}/ray.db"
    steps, blocks = [4, 8], [1, 3]
    serial = run_freeze_test(baseline, steps, blocks, serial_store, progress=False, executor="serial")
    children = run_freeze_test(baseline, steps, blocks, ray_store, progress=False, executor="ray")
    stored = _children(ray_store, baseline)
    assert sorted(r.info.run_id for r in stored) == sorted(children) and len(set(children)) == 4
    cells = {(r.data.tags[TAG_FREEZE_STEP], r.data.tags[TAG_FREEZE_BLOCKS]) for r in stored}
    assert cells == {(str(t), str(b)) for t in steps for b in blocks}
    assert all(
        r.info.status == "FINISHED" and r.data.tags[TAG_PARENT] == baseline and r.data.tags[MLFLOW_PARENT] == baseline
        for r in stored
    )
    client_s, client_r = MlflowClient(serial_store), MlflowClient(ray_store)
    for s, r in zip(serial, children, strict=True):
        assert client_r.get_run(r).data.metrics["val/loss_pixel"] == client_s.get_run(s).data.metrics["val/loss_pixel"]


# ----------------------------------------------------------------------------- a worker killed mid-grid


def _wait_for_running_child(store: str, parent: str, proc, timeout: float = 240) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for r in _children(store, parent) if os.path.exists(store.removeprefix("sqlite:///")) else []:
            owner = r.data.tags.get(TAG_OWNER, "")
            if r.info.status == "RUNNING" and " pid " in owner and r.data.metrics.get("train/loss") is not None:
                return r.info.run_id, int(owner.rsplit(" pid ", 1)[1])
        time.sleep(0.5)
    ended = proc.communicate()[1][-2000:] if proc.poll() is not None else ""
    raise AssertionError(f"no child started training: {ended}")


@pytest.mark.system
def test_a_worker_killed_mid_grid_is_reported_and_the_rerun_trains_only_the_rest(store: str) -> None:
    baseline = _baseline(store, steps=40)
    cmd = [
        sys.executable,
        "-m",
        "experiments",
        "freeze-test",
        "--baseline",
        baseline,
        "--steps",
        "8,16",
        "--blocks",
        "1,2",
        "--executor",
        "local",
        "--workers",
        "2",
        "--tracking-uri",
        store,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim, pid = _wait_for_running_child(store, baseline, proc)
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert f"FAILED ({victim}): {ex.WORKER_DIED}" in err and "1 of 4 runs did not finish" in err
    client = MlflowClient(store)
    assert client.get_run(victim).info.status == "FAILED"
    assert client.get_run(victim).data.tags["layerlock.failure_reason"].startswith(ex.WORKER_DIED)
    before = {r.info.run_id for r in _children(store, baseline) if r.info.status == "FINISHED"}
    assert len(before) == 3

    again = run_cli(*cmd[1:], timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already FINISHED") == 3
    stored = _children(store, baseline)
    cells = [(r.data.tags[TAG_FREEZE_STEP], r.data.tags[TAG_FREEZE_BLOCKS]) for r in stored]
    assert sorted(cells) == sorted({(t, b) for t in ("8", "16") for b in ("1", "2")})  # each cell once
    assert all(r.info.status == "FINISHED" for r in stored) and before < {r.info.run_id for r in stored}


@pytest.mark.system
def test_a_ray_worker_that_dies_fails_its_run_and_the_others_finish(store: str) -> None:
    """``--executor ray``: SIGKILL to the Ray worker process training one child (Ray raises
    WorkerCrashedError; tasks are not retried): that run is FAILED with its reason, the other three
    finish, the command lists the failure and exits 1."""
    pytest.importorskip("ray")
    baseline = _baseline(store, steps=40)
    cmd = [sys.executable, "-m", "experiments", "freeze-test", "--baseline", baseline, "--steps", "8,16"]
    cmd += ["--blocks", "1,2", "--executor", "ray", "--tracking-uri", store]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim, pid = _wait_for_running_child(store, baseline, proc)
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert f"FAILED ({victim}): {ex.WORKER_DIED} (WorkerCrashedError)" in err, err[-3000:]
    assert "1 of 4 runs did not finish" in err
    stored = {r.info.run_id: r for r in _children(store, baseline)}
    assert stored[victim].info.status == "FAILED"
    assert stored[victim].data.tags["layerlock.failure_reason"].startswith(ex.WORKER_DIED)
    assert sorted(r.info.status for r in stored.values()) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]


def test_freeze_test_specs_check_the_grid_before_anything_trains(store: str) -> None:
    baseline = _baseline(store)
    with pytest.raises(LayerLockError, match="no checkpoint at step 5"):
        freeze_test_specs(baseline, [5], [1], store)
    with pytest.raises(LayerLockError, match="between 1 and 3"):
        freeze_test_specs(baseline, [4], [4], store)
    (spec,) = freeze_test_specs(baseline, [4], [2], store)
    assert spec.init_from == (baseline, 4) and spec.tags[TAG_PARENT] == baseline


@pytest.mark.system
def test_ctrl_c_stops_every_worker_and_leaves_no_run_running(store: str) -> None:
    baseline = _baseline(store, steps=40)
    cmd = [
        sys.executable,
        "-m",
        "experiments",
        "freeze-test",
        "--baseline",
        baseline,
        "--steps",
        "8,16",
        "--blocks",
        "1,2",
        "--executor",
        "local",
        "--workers",
        "2",
        "--tracking-uri",
        store,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_running_child(store, baseline, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    stopped = _children(store, baseline)
    assert stopped and all(r.info.status in ("KILLED", "FAILED", "FINISHED") for r in stopped)
    again = run_cli(*cmd[1:], timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    stored = _children(store, baseline)
    assert len(stored) == 4 and all(r.info.status == "FINISHED" for r in stored)


@pytest.mark.system
def test_launch_page_starts_a_seed_group_through_the_executor(tmp_path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    from app import jobs
    from tests.helpers import HOME, TIMEOUT, point_app_at

    point_app_at(f"sqlite:///{tmp_path}/m.db", tmp_path, monkeypatch)
    monkeypatch.setenv(jobs.MAX_JOBS_ENV, "3")
    # No training on a shared CPU: the job sleeps; what matters is the command it was given.
    monkeypatch.setattr(jobs, "pretrain_argv", lambda *a, **k: [sys.executable, "-c", "import time; time.sleep(30)"])
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    at.switch_page("screens/launch.py").run()
    assert at.number_input(key="launch_workers").value == 2
    at.number_input(key="launch_seed").set_value(3)
    at.text_input(key="launch_seeds").input("0,1,2")
    at.button(key="launch_submit").click().run()
    assert any("Seed and Seeds" in w.value for w in at.warning) and not jobs.list_jobs()
    at.number_input(key="launch_seed").set_value(None)
    at.selectbox(key="launch_executor").set_value("serial")
    at.number_input(key="launch_workers").set_value(3)
    at.button(key="launch_submit").click().run()
    assert not at.exception and any("Started" in s.value for s in at.success), [w.value for w in at.warning]
    (job,) = jobs.list_jobs()
    try:
        tail = job.argv[job.argv.index("--seeds") :]
        assert tail[:6] == ["--seeds", "0,1,2", "--executor", "serial", "--workers", "3"]
    finally:
        jobs.cancel(job)


class _Stop(Exception):
    pass


def test_demo_trains_the_runs_whose_wall_times_it_compares_one_at_a_time(tmp_path, monkeypatch) -> None:
    """mae and freeze_only (freeze-only's wall saving is measured against mae) each train in an
    executor call of their own, one run, with nothing else training; the others train together."""
    import core.readout
    from experiments import demo

    calls: list[list[str]] = []

    def fake_run_specs(specs, **kwargs):
        calls.append([s.label for s in specs])
        return [ex.RunResult(s.key, s.label, f"id-{s.label}", "FINISHED") for s in specs]

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(ex, "run_specs", fake_run_specs)
    monkeypatch.setattr(demo, "derive_demo_schedule", lambda *a, **k: (tmp_path / "s.json", {}))
    monkeypatch.setattr(core.readout, "load_eval_data", stop)
    with pytest.raises(_Stop):
        demo.run_demo(8, None, 2, 0.95, 0, 0.75, None, tmp_path, seeds=[0, 1], progress=False)
    together = ["layerlock seed 0", "latent_scheduled seed 0", "latent_naive seed 0"]
    together += [label.replace("seed 0", "seed 1") for label in together]
    assert calls == [
        ["mae seed 0"],
        ["mae seed 1"],
        together,
        ["freeze_only seed 0"],
        ["freeze_only seed 1"],
    ]


def test_then_adds_dependent_runs_to_the_set_as_their_baseline_finishes(store: str, monkeypatch) -> None:
    """``then``: a finished spec's dependents join the set (and train after what was queued before
    them); results follow in the order added; an error in ``then`` stops adding runs."""
    trained: list[str] = []

    def fake_train(spec, resume, uri, where="pool", nproc=1):
        trained.append(spec.label)
        return ex.RunResult(spec.key, spec.label, f"id-{spec.label}", "FINISHED")

    def spec(label: str) -> ex.RunSpec:
        return ex.RunSpec(label, {}, {"which": label})

    deps = {"a": ["a1", "a2"], "a1": ["a11"]}
    then = lambda s, r: [spec(x) for x in deps.get(s.label, [])]  # noqa: E731
    monkeypatch.setattr(ex, "train_spec", fake_train)
    out = ex.run_specs([spec("a"), spec("b")], executor="serial", uri=store, progress=False, then=then)
    assert trained == ["a", "b", "a1", "a2", "a11"]
    assert [r.label for r in out] == trained and all(r.status == "FINISHED" for r in out)

    def boom(s, r):
        raise LayerLockError("no checkpoints")

    with pytest.raises(LayerLockError, match="no checkpoints"):
        ex.run_specs([spec("c"), spec("d")], executor="serial", uri=store, progress=False, then=boom)
    assert trained[-2:] == ["c", "d"]  # the error stops adding runs, not the runs of the set


@pytest.mark.system
def test_launch_page_starts_a_freeze_test_grid_through_the_executor(tmp_path, monkeypatch) -> None:
    """The Launch page's grid form: ``freeze-test --baseline RUN --grid`` with the executor and
    workers chosen (capped by LAYERLOCK_MAX_JOBS), started as a job; a second one past the cap is refused."""
    from streamlit.testing.v1 import AppTest

    from app import jobs
    from core.schema import TAG_METHOD
    from tests.helpers import HOME, TIMEOUT, point_app_at

    store = f"sqlite:///{tmp_path}/m.db"
    point_app_at(store, tmp_path, monkeypatch)
    client = MlflowClient(store)
    base = client.create_run(client.create_experiment("e"), tags={TAG_METHOD: "mae"}, run_name="base").info.run_id
    client.set_terminated(base, "FINISHED")
    monkeypatch.setenv(jobs.MAX_JOBS_ENV, "1")
    built: list[list[str]] = []
    real = jobs.freeze_test_argv

    def sleeper(*a, **k):  # no training on a shared CPU: the job sleeps; what matters is its command
        built.append(real(*a, **k))
        return [sys.executable, "-c", "import time; time.sleep(30)"]

    monkeypatch.setattr(jobs, "freeze_test_argv", sleeper)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    at.switch_page("screens/launch.py").run()
    assert at.number_input(key="grid_workers").value == 1  # the cap
    at.button(key="grid_submit").click().run()
    assert any("choose a baseline" in w.value for w in at.warning) and not jobs.list_jobs()
    at.selectbox(key="grid_baseline").set_value(base)
    at.selectbox(key="grid_executor").set_value("local")
    at.button(key="grid_submit").click().run()
    assert not at.exception and any("freeze-test grid" in s.value for s in at.success), [w.value for w in at.warning]
    (job,) = jobs.list_jobs()
    try:
        assert built[0][2:9] == ["experiments", "freeze-test", "--baseline", base, "--grid", "--executor", "local"]
        assert built[0][9:11] == ["--workers", "1"] and job.source == "launch-grid"
        at.button(key="grid_submit").click().run()
        assert any("at most 1" in w.value for w in at.warning) and len(jobs.list_jobs()) == 1
    finally:
        jobs.cancel(job)
