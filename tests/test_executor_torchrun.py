"""``--nproc-per-run N``: each run of a set trains as N processes under torch's own launcher
(torchrun, DistributedDataParallel, gloo on CPU) inside its worker; the run's result is what its
ranks wrote; a rank that dies fails its run and nothing else; bad input is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from core.schema import HELDOUT_KEY, TAG_FAILURE, TAG_GROUP, TAG_RUN_KEY, TAG_WORLD_SIZE
from experiments import executor as ex
from experiments.cli import main
from tests.helpers import ROOT, run_cli, tiny_sets


def _seeds_cmd(store: str, **sets) -> list[str]:
    """``pretrain --seeds 0,1`` of the tiny config, one local worker, two processes a run."""
    return [
        "-m",
        "experiments",
        "pretrain",
        "--config",
        "experiments/configs/mae_tiny.yaml",
        *tiny_sets(**sets),
        "--seeds",
        "0,1",
        "--executor",
        "local",
        "--workers",
        "1",
        "--nproc-per-run",
        "2",
        "--tracking-uri",
        store,
    ]


def _runs(store: str) -> list:
    client = MlflowClient(store)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


# ----------------------------------------------------------------------------- bad input (fast)


def test_nproc_per_run_under_torchrun_or_for_one_run_exits_2(capsys, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for the command's own ranks
    for command in (
        ["freeze-test", "--baseline", "0" * 32, "--steps", "4", "--blocks", "1"],
        ["pretrain", "--config", "experiments/configs/mae_tiny.yaml", "--seeds", "0,1"],
        ["study", "--seeds", "0"],
        ["demo"],
    ):
        assert main([*command, "--nproc-per-run", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --nproc-per-run 2 starts torchrun"), err
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["pretrain", "--config", "experiments/configs/mae_tiny.yaml", "--nproc-per-run", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --nproc-per-run is for the runs of --seeds"), err


def test_the_pool_gives_each_run_its_processes_cores(monkeypatch) -> None:
    monkeypatch.setattr(ex, "_cores", lambda: 8)
    assert ex.default_workers() == 8 and ex.default_workers(2) == 4 and ex.default_workers(16) == 1


def test_a_rank_that_wrote_nothing_is_the_reason_its_run_failed(tmp_path: Path, store: str) -> None:
    """What the worker reads back: rank 0's result when it finished; else the first cause (a rank
    without a result, or the rank that failed first), not a guess from torchrun's exit code."""
    import json

    spec = ex.RunSpec("s", {}, {"x": "1"})

    def write(rank: int, status: str, reason: str | None, ended: float, run_id: str | None = None) -> None:
        out = {"rank": rank, "run_id": run_id, "status": status, "reason": reason, "ended": ended, "train": None}
        (tmp_path / ex.RANK_FILE.format(rank=rank)).write_text(json.dumps(out))

    write(0, "FAILED", "TrainingDiverged: loss is nan at step 3", 1.0)
    write(1, "FAILED", "RuntimeError: Connection closed by peer", 2.0)
    res = ex._ranks_result(spec, None, store, tmp_path, 2, 1, stopped=False)
    assert (res.status, res.reason) == ("FAILED", "TrainingDiverged: loss is nan at step 3")
    write(1, "FAILED", "RuntimeError: out of memory", 0.5)
    res = ex._ranks_result(spec, None, store, tmp_path, 2, 1, stopped=False)
    assert res.reason == "rank 1 of 2 failed: RuntimeError: out of memory"
    (tmp_path / ex.RANK_FILE.format(rank=1)).unlink()
    res = ex._ranks_result(spec, None, store, tmp_path, 2, 1, stopped=False)
    assert res.status == "FAILED" and res.reason.startswith("rank 1 of 2 died without a result")


# ----------------------------------------------------------------------------- through torchrun (system)


@pytest.mark.system
def test_two_runs_train_as_two_processes_each_under_torchrun(store: str) -> None:
    """Two tiny runs through one local worker, each as 2 gloo ranks under torchrun: each in the store
    once, FINISHED, with its tags and world size 2; the same command again trains nothing."""
    cmd = _seeds_cmd(store, **{"train.steps": 6, "probe.every": 3})
    proc = run_cli(*cmd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    runs = _runs(store)
    assert len(ids) == 2 and sorted(r.info.run_id for r in runs) == sorted(ids)  # each once, nothing else
    by_id = {r.info.run_id: r for r in runs}
    for seed, run_id in enumerate(ids):
        run = by_id[run_id]
        assert run.info.status == "FINISHED"
        assert run.data.tags[TAG_WORLD_SIZE] == "2"
        assert run.data.params["train.seed"] == str(seed) and f"train.seed={seed}" in run.data.tags[TAG_RUN_KEY]
        assert run.data.metrics[HELDOUT_KEY] > 0  # rank 0 logs to the end
    assert len({by_id[i].data.tags[TAG_GROUP] for i in ids}) == 1

    again = run_cli(*cmd, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already FINISHED") == 2
    assert sorted(r.info.run_id for r in _runs(store)) == sorted(ids)


def _last_step(store: str, run_id: str, key: str) -> int:
    return max((m.step for m in MlflowClient(store).get_metric_history(run_id, key)), default=-1)


def _rank_pid(rank: int) -> int | None:
    """The pid of a live ``experiments.torchrun_spec`` process whose RANK is ``rank``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"experiments.torchrun_spec" not in (entry / "cmdline").read_bytes():
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.system
def test_a_rank_killed_fails_its_run_the_other_finishes_and_the_rerun_resumes_it(tmp_path, store: str) -> None:
    cmd = _seeds_cmd(store, **{"train.steps": 400, "probe.every": 100, "train.checkpoint_every": 10})
    log = tmp_path / "first.log"
    assert _runs(store) == []  # the store exists before the command runs: polling it never races its creation
    with log.open("w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, *cmd],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
        )
        try:
            victim, deadline = None, time.monotonic() + 300
            while victim is None and time.monotonic() < deadline and proc.poll() is None:
                running = [r for r in _runs(store) if r.info.status == "RUNNING"]
                # A loss stored past step 20: the step-10 checkpoint is written, so the rerun resumes the run.
                if running and _last_step(store, running[0].info.run_id, "train/loss") >= 20:
                    victim = running[0].info.run_id
                    pid = _rank_pid(1)
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)
            assert victim is not None, log.read_text()[-3000:]
            proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = log.read_text()
    assert proc.returncode == 1, err[-3000:]
    assert f"FAILED ({victim}): rank 1 of 2 died" in err and "1 of 2 runs did not finish" in err, err[-3000:]
    runs = {r.info.run_id: r for r in _runs(store)}
    assert len(runs) == 2 and runs[victim].info.status == "FAILED"
    assert runs[victim].data.tags[TAG_FAILURE].startswith("rank 1 of 2 died")
    (other,) = [r for r in runs.values() if r.info.run_id != victim]
    assert other.info.status == "FINISHED" and other.data.tags[TAG_WORLD_SIZE] == "2"

    again = run_cli(*cmd, timeout=600)  # resumes the failed run from its checkpoint, under torchrun
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already FINISHED") == 1
    final = {r.info.run_id: r for r in _runs(store)}
    assert final.keys() == runs.keys() and all(r.info.status == "FINISHED" for r in final.values())
    assert final[victim].data.metrics[HELDOUT_KEY] > 0
