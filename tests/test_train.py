"""Trainer: smoke run of the entry point, kill + resume equivalence, NaN handling, logged keys."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from core.config import ExperimentConfig
from core.errors import TrainingDiverged
from core.train import load_run_checkpoint, train
from tests.helpers import ROOT, run_cli, tiny_dict


@pytest.mark.system
def test_pretrain_entry_point_smoke(tmp_path, store):
    proc = run_cli(
        "-m",
        "experiments",
        "pretrain",
        "--config",
        "experiments/configs/mae_tiny.yaml",
        "--set",
        "train.steps=6",
        "--set",
        "train.batch_size=4",
        "--set",
        "probe.every=3",
        "--set",
        "train.checkpoint_every=3",
        "--set",
        "train.log_every=2",
        "--tracking-uri",
        store,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = proc.stdout.strip().splitlines()[-1]
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["layerlock.method"] == "mae" and run.data.tags["layerlock.dataset"] == "moving_digits"
    assert run.data.params["model.depth"] == "8" and run.data.params["train.steps"] == "6"
    for key in (
        "train/loss",
        "train/loss_pixel",
        "train/lr",
        "train/frozen_blocks",
        "train/step_ms",
        "train/clips_per_s",
        "train/flops",
        "train/wall_s",
        "cka_final/block_00",
        "grad_norm/block_07",
        "val/loss_pixel",
    ):
        assert key in run.data.metrics, key
    heldout = client.get_metric_history(run_id, "val/loss_pixel")
    assert [m.step for m in heldout] == [6] and 0 < heldout[0].value < 10  # once, at the end
    names = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "flop_model.json", "layer_metrics.parquet", "checkpoints", "probe"} <= names


def _final_weights(run_id: str, store: str) -> dict:
    return load_run_checkpoint(run_id, tracking_uri=store)["model"]


@pytest.mark.system
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, store):
    sets = [
        "--set",
        "train.steps=120",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.checkpoint_every=20",
        "--set",
        "probe.every=20",
        "--set",
        "train.log_every=5",
    ]
    base = [
        sys.executable,
        "-m",
        "experiments",
        "pretrain",
        "--config",
        "experiments/configs/mae_tiny.yaml",
        *sets,
        "--tracking-uri",
        store,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(base, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    pattern = str(tmp_path / "mlartifacts" / "**" / "checkpoints" / "step_000040.pt")
    deadline = time.time() + 240
    while not glob.glob(pattern, recursive=True) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    client = MlflowClient(store)
    killed = client.search_runs([client.get_experiment_by_name("layerlock").experiment_id])[0]
    run_id = killed.info.run_id
    done_before = max(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert done_before < 119

    resumed = run_cli("-m", "experiments", "pretrain", "--resume", run_id, "--tracking-uri", store)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.strip().splitlines()[-1] == run_id

    straight = run_cli(*base[1:])
    assert straight.returncode == 0, straight.stderr[-2000:]
    other_id = straight.stdout.strip().splitlines()[-1]

    a, b = _final_weights(run_id, store), _final_weights(other_id, store)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run ended at different weights"
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("train/loss", "cka_prev/block_03", "grad_norm/block_05", "train/frozen_blocks"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} has repeated steps"
        ref = sorted(m.step for m in client.get_metric_history(other_id, key))
        assert sorted(steps) == ref, key


def test_nan_loss_fails_run_and_keeps_metrics(monkeypatch, store):
    import core.objectives as objectives
    import core.train as train_mod

    real = objectives.compute_losses
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_mod, "compute_losses", flaky)
    cfg = ExperimentConfig.model_validate(tiny_dict(train={"time_calibration": 0}))  # count training steps only
    with pytest.raises(TrainingDiverged, match="step 5"):
        train(cfg, tracking_uri=store, progress=False)
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("layerlock").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert "nan" in run.data.tags["layerlock.failure_reason"]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 2


def test_layerlock_logs_latent_loss_only_after_first_freeze(store):
    cfg = ExperimentConfig.model_validate(
        tiny_dict(
            objective={"name": "layerlock"},
            freeze={"schedule": [{"step": 6, "frozen": 1}, {"step": 9, "frozen": 2}]},
            train={"steps": 12, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 1},
        )
    )
    result = train(cfg, tracking_uri=store, progress=False)
    client = MlflowClient(store)
    latent = client.get_metric_history(result.run_id, "train/loss_latent")
    assert latent and min(m.step for m in latent) == 6
    frozen = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/frozen_blocks")}
    assert frozen[5] == 0 and frozen[6] == 1 and frozen[11] == 2
    assert {f.path for f in client.list_artifacts(result.run_id)} >= {"schedule.json"}
    assert client.get_run(result.run_id).data.tags["layerlock.method"] == "layerlock"


def test_latent_scheduled_follows_the_target_schedule_and_freezes_nothing(store):
    cfg = ExperimentConfig.model_validate(
        tiny_dict(
            objective={"name": "latent_scheduled"},
            freeze={"schedule": [{"step": 6, "frozen": 1}, {"step": 9, "frozen": 2}]},
            train={"steps": 12, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 1},
        )
    )
    result = train(cfg, tracking_uri=store, progress=False)
    client = MlflowClient(store)
    latent = client.get_metric_history(result.run_id, "train/loss_latent")
    assert latent and min(m.step for m in latent) == 6  # from the first stage on
    frozen = client.get_metric_history(result.run_id, "train/frozen_blocks")
    assert {m.step for m in frozen} >= set(range(12)) and all(m.value == 0 for m in frozen)
    grads = {m.step for m in client.get_metric_history(result.run_id, "grad_norm/block_00")}
    assert max(grads) == 11  # block 0 still trains at the last stage
    run = client.get_run(result.run_id)
    assert run.data.tags["layerlock.method"] == "latent_scheduled"
    fm = json.loads(Path(client.download_artifacts(result.run_id, "flop_model.json", tempfile.mkdtemp())).read_text())
    per = {int(k): v for k, v in fm["per_step"].items()}
    # cumulative FLOPs follow the stage: 6 steps at stage 0, 3 at stage 1, 3 at stage 2
    assert run.data.metrics["train/flops"] == pytest.approx(6 * per[0] + 3 * per[1] + 3 * per[2])


def test_analysis_convergence_prints_what_its_metric_measures(store, capsys):
    from analysis.__main__ import main
    from core.schema import metric_help

    run_id = train(ExperimentConfig.model_validate(tiny_dict()), tracking_uri=store, progress=False).run_id
    for method, metric in (("posthoc", "cka_final"), ("online", "cka_prev")):
        assert main(["convergence", "--run", run_id, "--method", method, "--tracking-uri", store]) == 0
        assert f"{metric}: {metric_help(metric)}" in capsys.readouterr().out.splitlines()
        assert main(["convergence", "--run", run_id, "--method", method, "--json", "--tracking-uri", store]) == 0
        assert json.loads(capsys.readouterr().out)["metric_help"] == metric_help(metric) != ""


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "experiments/configs/mae_tiny.yaml", "--set", "model.dpth=2"], "unknown config key 'model.dpth'"),
        (["--config", "experiments/configs/mae_tiny.yaml", "--set", "data.name=imagenet"], "data.name"),
        (["--config", "experiments/configs/mae_tiny.yaml", "--set", "train.lr=-1"], "train.lr"),
        (["--config", "no/such.yaml"], "config file not found"),
        (
            ["--config", "experiments/configs/mae_tiny.yaml", "--set", "freeze.schedule=/no/such.json"],
            "schedule file not found",
        ),
        (
            [
                "--config",
                "experiments/configs/mae_tiny.yaml",
                "--set",
                "data.name=video_folder",
                "--set",
                "data.root=/no/such/folder",
            ],
            "/no/such/folder",
        ),
        (["--resume", "0123456789abcdef0123456789abcdef"], "run not found"),
        (
            ["--config", "experiments/configs/mae_tiny.yaml", "--tracking-uri", "bogus://nowhere"],
            "tracking URI bogus://nowhere: unsupported scheme 'bogus'",
        ),
    ],
)
@pytest.mark.system
def test_bad_input_exits_2_with_one_line(args, needle, store):
    if "--tracking-uri" not in args:
        args = [*args, "--tracking-uri", store]
    proc = run_cli("-m", "experiments", "pretrain", *args)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_block_key_logged_and_parquet_matches_mlflow(tmp_path, store):
    import pandas as pd

    cfg = ExperimentConfig.model_validate(tiny_dict())
    result = train(cfg, tracking_uri=store, progress=False)
    client = MlflowClient(store)
    keys = client.get_run(result.run_id).data.metrics.keys()
    metrics = ("cka_prev", "cka_init", "cka_final", "grad_norm", "update_ratio", "eff_rank", "feat_std")
    for m in metrics:
        for b in range(cfg.model.depth):
            assert f"{m}/block_{b:02d}" in keys, (m, b)
    path = client.download_artifacts(result.run_id, "layer_metrics.parquet", str(tmp_path))
    frame = pd.read_parquet(path)
    assert set(frame["metric"]) == set(metrics)
    from_mlflow = {
        (m.step, b, name): m.value
        for name in metrics
        for b in range(cfg.model.depth)
        for m in client.get_metric_history(result.run_id, f"{name}/block_{b:02d}")
    }
    from_parquet = {(int(r.step), int(r.block), r.metric): r.value for r in frame.itertuples()}
    assert from_parquet.keys() == from_mlflow.keys()
    assert all(abs(from_parquet[k] - from_mlflow[k]) <= 1e-6 * max(1.0, abs(from_mlflow[k])) for k in from_mlflow)
    # cka_final is 1 at the last probe and computed for every probe step
    last = frame[(frame.metric == "cka_final")].step.max()
    assert last == cfg.train.steps
    assert frame[(frame.metric == "cka_final") & (frame.step == last)].value.round(6).eq(1.0).all()


@pytest.mark.system
def test_torchrun_two_processes_ddp_across_freeze_changes(store):
    """DDP (gloo on CPU) is rebuilt when the frozen prefix changes; rank 0 alone logs."""
    proc = run_cli(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "experiments",
        "pretrain",
        "--config",
        "experiments/configs/layerlock_tiny.yaml",
        "--set",
        "train.steps=12",
        "--set",
        "train.batch_size=8",
        "--set",
        "probe.every=4",
        "--set",
        "train.checkpoint_every=6",
        "--set",
        "train.log_every=2",
        "--set",
        "model.depth=4",
        "--set",
        "model.dim=32",
        "--tracking-uri",
        store,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(ids) == 1
    client = MlflowClient(store)
    run = client.get_run(ids[0])
    assert run.info.status == "FINISHED"
    frozen = sorted({m.value for m in client.get_metric_history(ids[0], "train/frozen_blocks")})
    assert frozen[0] == 0 and frozen[-1] >= 2
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.system
def test_pretrain_on_video_folder_counts_skipped_files(tmp_path, store):
    from tests.helpers import tiny_sets, write_video

    root = tmp_path / "clips"
    for cls, color in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            write_video(root / cls / f"{cls}{k}.mp4", color)
    (root / "blue" / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    proc = run_cli(
        "-m",
        "experiments",
        "pretrain",
        "--config",
        "experiments/configs/mae_tiny.yaml",
        *tiny_sets(**{"data.name": "video_folder", "data.root": str(root), "train.steps": 4}),
        "--tracking-uri",
        store,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "broken.mp4" in proc.stderr
    run = MlflowClient(store).get_run(proc.stdout.strip().splitlines()[-1])
    assert run.data.metrics["data/skipped_files"] == 1
    assert run.data.tags["layerlock.dataset"] == "video_folder"


def test_time_model_is_logged_and_calibration_changes_nothing_learned(store):
    """Every run logs time_model.json (training steps per stage, a start-up calibration of the
    schedule's stages); the calibration runs on a copy, so the trained weights are the same
    with it and without it. Only the structure is checked: the times are the machine's."""
    sched = {"schedule": [{"step": 4, "frozen": 1}, {"step": 8, "frozen": 3}]}
    with_cal = train(ExperimentConfig.model_validate(tiny_dict(freeze=sched)), tracking_uri=store, progress=False)
    without = train(
        ExperimentConfig.model_validate(tiny_dict(freeze=sched, train={"time_calibration": 0})),
        tracking_uri=store,
        progress=False,
    )
    a, b = _final_weights(with_cal.run_id, store), _final_weights(without.run_id, store)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert with_cal.final_loss == without.final_loss and with_cal.wall_s > 0 and with_cal.loop_s >= with_cal.wall_s
    client = MlflowClient(store)
    assert (
        client.get_run(with_cal.run_id).data.tags["layerlock.group"]
        == client.get_run(without.run_id).data.tags["layerlock.group"]
    )  # measuring does not make another group
    tm = json.loads(Path(client.download_artifacts(with_cal.run_id, "time_model.json", tempfile.mkdtemp())).read_text())
    assert set(tm["training"]) == {"0", "1", "3"} and set(tm["calibration"]) == {"0", "1", "3"}
    assert [tm["training"][k]["steps"] for k in ("0", "1", "3")] == [4, 4, 4]
    assert all(s["n"] == 5 and s["median_s"] > 0 for s in tm["calibration"].values())
    assert set(tm["flops_per_step"]) == {"0", "1", "2", "3"} and tm["overhead_s_per_step"] > 0  # probes
    assert tm["total_steps"] == 12 and tm["total_s"] > 0
    assert set(tm["cpu"]["training"]) == {"0", "1", "3"} and set(tm["cpu"]["calibration"]) == {"0", "1", "3"}
    tm0 = json.loads(Path(client.download_artifacts(without.run_id, "time_model.json", tempfile.mkdtemp())).read_text())
    assert tm0["calibration"] == {} and set(tm0["training"]) == {"0", "1", "3"}


def test_background_probes_in_the_trainer_log_the_same_numbers(monkeypatch, store):
    """Where a core is free the trainer's probes read a copy of the weights in a background
    thread (core.monitor, ``background``). Forced on and off here: the same probe metrics at
    the same steps, the same layer_metrics rows, the same trained weights, checkpoints between."""
    import core.train as core_train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {}
    try:
        for spare in (False, True):
            monkeypatch.setattr(core_train, "spare_core", lambda device, n, _spare=spare: _spare)
            cfg = ExperimentConfig.model_validate(tiny_dict(train={"checkpoint_every": 3, "time_calibration": 0}))
            runs[spare] = train(cfg, tracking_uri=store, progress=False).run_id
    finally:
        torch.set_num_threads(threads)
    client = MlflowClient(store)
    for key in ("cka_prev/block_01", "cka_init/block_00", "eff_rank/block_01", "cka_final/block_00"):
        hist = {s: sorted((m.step, m.value) for m in client.get_metric_history(runs[s], key)) for s in runs}
        assert hist[False] and hist[False] == hist[True], key
    a, b = _final_weights(runs[False], store), _final_weights(runs[True], store)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = load_run_checkpoint(runs[True], step=6, tracking_uri=store)
    assert ckpt["probe"]["steps"] == load_run_checkpoint(runs[False], step=6, tracking_uri=store)["probe"]["steps"]
