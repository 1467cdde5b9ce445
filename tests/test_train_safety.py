"""Safe resume and shutdown: status changes only after a checkpoint loads, SIGTERM checkpoints and
marks the run KILLED, non-finite gradients skip the step, a corrupt newest checkpoint falls back."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import core.train as core_train
from core.config import ExperimentConfig
from core.errors import LayerLockError
from core.schema import checkpoint_step
from core.tracking import local_checkpoints, local_dir
from core.train import load_run_checkpoint, train
from tests.helpers import ROOT, tiny_dict, tiny_sets


def _cfg(**train_overrides) -> ExperimentConfig:
    return ExperimentConfig.model_validate(tiny_dict(train=train_overrides))


def _checkpoint_files(tmp_path: Path, run_id: str) -> dict[int, Path]:
    """The store's copies of a run's checkpoints, by step."""
    files = glob.glob(
        str(tmp_path / "mlartifacts" / "**" / run_id / "**" / "checkpoints" / "step_*.pt"), recursive=True
    )
    return {int(Path(f).stem.split("_")[1]): Path(f) for f in files}


def _truncate(tmp_path: Path, run_id: str, step: int) -> None:
    """Cut the checkpoint of ``step`` short in the store and in the run's local folder."""
    local = {checkpoint_step(n): p for n, p in local_checkpoints(local_dir(run_id)).items()}
    for path in (_checkpoint_files(tmp_path, run_id)[step], local.get(step)):
        if path is not None:
            path.write_bytes(path.read_bytes()[:100])


def test_corrupt_newest_checkpoint_falls_back_for_load_and_resume(tmp_path, store, capsys):
    first = train(_cfg(), tracking_uri=store, progress=False, stop_after=8)  # checkpoints at 4 and 8
    assert sorted(_checkpoint_files(tmp_path, first.run_id)) == [4, 8]
    _truncate(tmp_path, first.run_id, 8)  # a kill in the middle of a copy
    capsys.readouterr()

    ckpt = load_run_checkpoint(first.run_id, tracking_uri=store)  # what evaluate / freeze-test use
    assert ckpt["step"] == 4
    err = capsys.readouterr().err
    assert "step_000008.pt" in err and "using checkpoint checkpoints/step_000004.pt" in err

    with pytest.raises(LayerLockError, match="step 8"):  # an explicit step does not silently change
        load_run_checkpoint(first.run_id, step=8, tracking_uri=store)

    resumed = train(_cfg(), tracking_uri=store, resume_run_id=first.run_id, progress=False)
    assert resumed.run_id == first.run_id and resumed.steps == 12
    assert MlflowClient(store).get_run(first.run_id).info.status == "FINISHED"
    assert load_run_checkpoint(first.run_id, tracking_uri=store)["step"] == 12


def test_resume_that_cannot_load_leaves_the_status_alone(tmp_path, store):
    done = train(_cfg(), tracking_uri=store, progress=False)
    for path in _checkpoint_files(tmp_path, done.run_id).values():
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(LayerLockError, match="no checkpoint to resume from"):
        train(_cfg(), tracking_uri=store, resume_run_id=done.run_id, progress=False)
    assert MlflowClient(store).get_run(done.run_id).info.status == "FINISHED"
    with pytest.raises(LayerLockError, match="none of its checkpoints loads"):
        load_run_checkpoint(done.run_id, tracking_uri=store)


def test_nonfinite_gradients_skip_the_step_and_are_counted(store, monkeypatch):
    real = core_train.compute_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 6):  # finite loss, NaN gradients everywhere
            losses["loss"].register_hook(lambda g: g * float("nan"))
        return losses

    monkeypatch.setattr(core_train, "compute_losses", poisoned)
    result = train(_cfg(time_calibration=0), tracking_uri=store, progress=False)  # count training steps only
    client = MlflowClient(store)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    skipped = client.get_metric_history(result.run_id, "train/skipped_steps")
    assert max(m.value for m in skipped) == 2
    assert [m.value for m in sorted(skipped, key=lambda m: m.step)][-1] == 2
    weights = load_run_checkpoint(result.run_id, tracking_uri=store)["model"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


@pytest.mark.system
def test_sigterm_flushes_checkpoints_and_marks_the_run_killed(tmp_path, store):
    cmd = [
        sys.executable,
        "-m",
        "experiments",
        "pretrain",
        "--config",
        "experiments/configs/mae_tiny.yaml",
        *tiny_sets(**{"train.steps": 5000, "train.checkpoint_every": 10, "train.log_every": 1, "probe.every": 10}),
        "--tracking-uri",
        store,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pattern = str(tmp_path / "mlartifacts" / "**" / "checkpoints" / "step_000010.pt")
    deadline = time.time() + 240
    while not glob.glob(pattern, recursive=True) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be terminated"
    time.sleep(0.5)  # a few steps past the checkpoint
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "marked KILLED" in err

    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("layerlock").experiment_id])[0]
    assert run.info.status == "KILLED"
    ckpt = load_run_checkpoint(run.info.run_id, tracking_uri=store)
    assert 10 <= ckpt["step"] < 5000
    # every step trained before the stop was flushed (log_every=1: steps 0 .. step-1)
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(ckpt["step"]))


def test_evaluate_uses_the_previous_checkpoint_when_the_newest_is_truncated(tmp_path, store, capsys):
    from experiments.evaluate import evaluate_run

    done = train(_cfg(), tracking_uri=store, progress=False)  # checkpoints at 4, 8, 12
    _truncate(tmp_path, done.run_id, 12)
    capsys.readouterr()
    metrics = evaluate_run(
        done.run_id, tasks=["digit"], tracking_uri=store, probe="linear", train_clips=16, val_clips=8, progress=False
    )
    assert metrics and all(v == v for v in metrics.values())
    assert "using checkpoint checkpoints/step_000008.pt" in capsys.readouterr().err
    logged = MlflowClient(store).get_run(done.run_id).data.metrics
    assert any(k.startswith("eval/digit/") for k in logged)
