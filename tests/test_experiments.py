"""Entry points beyond pretrain: freeze-test, bench (smoke runs against a temporary store)."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from tests.helpers import run_cli, tiny_sets


def _pretrain(store: str, *extra: str) -> str:
    proc = run_cli(
        "-m",
        "experiments",
        "pretrain",
        "--config",
        "experiments/configs/mae_tiny.yaml",
        *tiny_sets(),
        *extra,
        "--tracking-uri",
        store,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.system
def test_freeze_test_children_and_grid(store):
    baseline = _pretrain(store)
    proc = run_cli(
        "-m",
        "experiments",
        "freeze-test",
        "--baseline",
        baseline,
        "--steps",
        "4,8",
        "--blocks",
        "1,3",
        "--tracking-uri",
        store,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(store)
    children = client.search_runs(
        [client.get_run(baseline).info.experiment_id], filter_string=f"tags.`layerlock.parent` = '{baseline}'"
    )
    cells = {(r.data.tags["layerlock.freeze_test.step"], r.data.tags["layerlock.freeze_test.blocks"]) for r in children}
    assert cells == {("4", "1"), ("4", "3"), ("8", "1"), ("8", "3")}
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["layerlock.method"] == "freeze_test"
        frozen = client.get_metric_history(r.info.run_id, "train/frozen_blocks")
        assert min(m.step for m in frozen) >= int(r.data.tags["layerlock.freeze_test.step"])
    grid = run_cli("-m", "analysis", "freeze-grid", "--parent", baseline, "--json", "--tracking-uri", store)
    assert grid.returncode == 0, grid.stderr
    assert len(json.loads(grid.stdout)["cells"]) == 4


@pytest.mark.system
def test_freeze_test_bad_input_exit_2(store):
    baseline = _pretrain(store)
    for args, needle in (
        (["--steps", "5", "--blocks", "1"], "no checkpoint at step 5"),
        (["--steps", "4", "--blocks", "4"], "--blocks 4"),
        (["--steps", "x", "--blocks", "1"], "comma-separated integers"),
    ):
        proc = run_cli("-m", "experiments", "freeze-test", "--baseline", baseline, *args, "--tracking-uri", store)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_grid_plan_picks_steps_and_blocks():
    from experiments.freeze_test import grid_blocks, grid_plan

    assert grid_blocks(8) == [1, 2, 4, 6] and grid_blocks(4) == [1, 2, 3] and grid_blocks(12) == [1, 3, 6, 9]
    steps, blocks, note = grid_plan(range(10, 101, 10), total_steps=100, depth=8)  # 9 interior checkpoints
    assert steps == [10, 30, 50, 70, 90] and blocks == [1, 2, 4, 6] and note is None
    steps, _, note = grid_plan([40, 80, 100], total_steps=100, depth=8)
    assert steps == [40, 80] and "too sparse" in note and "checkpoint_every <= 16" in note
    steps, blocks, note = grid_plan(range(100, 601, 100), total_steps=600, depth=8, n_steps=3, shallowest=False)
    assert steps == [100, 300, 500] and blocks == [2, 4, 6] and note is None  # the study's small grid


@pytest.mark.system
def test_freeze_test_grid_end_to_end(store):
    # 6 steps, checkpoints at 2, 4 (and 6, the end): sparse, so the grid uses T = 2, 4 and says so.
    baseline = _pretrain(store, "--set", "model.depth=3", "--set", "train.steps=6", "--set", "train.checkpoint_every=2")
    proc = run_cli("-m", "experiments", "freeze-test", "--baseline", baseline, "--grid", "--tracking-uri", store)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoints too sparse" in proc.stderr and "train.checkpoint_every <= 1" in proc.stderr
    assert "grid: T = 2, 4; L = 1, 2" in proc.stderr
    assert "not calibrated: no seed group of the baseline" in proc.stderr  # one seed only
    assert "largest converged prefix" in proc.stderr and proc.stdout.strip().splitlines()[-1] == baseline
    client = MlflowClient(store)
    children = client.search_runs(
        [client.get_run(baseline).info.experiment_id], filter_string=f"tags.`layerlock.parent` = '{baseline}'"
    )
    cells = {(r.data.tags["layerlock.freeze_test.step"], r.data.tags["layerlock.freeze_test.blocks"]) for r in children}
    assert cells == {("2", "1"), ("2", "2"), ("4", "1"), ("4", "2")}


@pytest.mark.system
def test_freeze_test_grid_conflicts_exit_2():
    for args, needle in ((["--grid", "--steps", "4"], "--grid picks"), ([], "needs --steps and --blocks")):
        proc = run_cli("-m", "experiments", "freeze-test", "--baseline", "nope", *args)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.system
def test_bench_freezing_json_reports_ratios():
    proc = run_cli(
        "-m",
        "experiments",
        "bench",
        "freezing",
        "--json",
        "--rounds",
        "1",
        "--max-rounds",
        "1",
        "--steps-per-round",
        "1",
        "--warmup",
        "0",
        "--batch-size",
        "4",
        *tiny_sets(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = out["rows"]
    assert [r["frozen"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["time_ratio"] == 1.0 and rows[0]["flop_ratio"] == 1.0 and rows[0]["cpu_ratio"] == 1.0
    assert all(r["flops"] > 0 and r["step_ms"] > 0 for r in rows)
    assert rows[-1]["flop_ratio"] < rows[1]["flop_ratio"] < 1.0
    # one round gives no interval, and the bench says it cannot resolve 1%
    assert out["rounds"] == 1 and rows[1]["time_low"] is None and out["resolved"] is False


@pytest.mark.system
def test_bench_tracking_json_reports_ratio():
    proc = run_cli(
        "-m",
        "experiments",
        "bench",
        "tracking",
        "--json",
        "--repeats",
        "1",
        "--max-repeats",
        "1",
        "--steps",
        "10",
        *tiny_sets(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["off_ms"] > 0 and out["on_ms"] > 0 and out["repeats"] == 1
    # whole probe-and-checkpoint periods after 5 warm-up steps, plus the last step
    assert out["steps"] == out["timed_steps"] + 6
    assert abs(out["ratio"] - out["on_ms"] / out["off_ms"]) < 2e-3  # one repeat: its ratio
    assert out["ratios"] == [out["ratio"]] and out["warm_up_ratio"] > 0
    assert out["low"] is None and out["resolved"] is False and out["cpu_ratio"] > 0


def test_per_step_ratio_keeps_recurring_costs_and_drops_one_runs_bursts():
    """Synthetic step times: 'on' costs 2% more at every step plus a 50 ms spike at the same
    two steps in every run; one run of each mode has a burst of other load (+30% on 40 of
    100 steps). The per-step medians keep the recurring cost and drop the bursts: the ratio is
    the true one within 0.2%, its bootstrap interval holds it; whole-run sums are off by more."""
    import numpy as np

    from experiments.bench.timing import per_step_ratio

    rng = np.random.default_rng(1)
    base = 0.1 + 0.002 * rng.standard_normal(100)

    def runs(scale: float, spikes: bool, burst: int) -> list[list[float]]:
        out = []
        for r in range(9):
            t = base * scale + 0.0005 * rng.standard_normal(100)
            if spikes:
                t[[0, 50]] += 0.05
            if r == burst:  # another job's burst in this run only
                start = rng.integers(0, 60)
                t[start : start + 40] *= 1.3
            out.append(t.tolist())
        return out

    on, off = runs(1.02, True, burst=1), runs(1.0, False, burst=6)
    truth = (base.sum() * 1.02 + 0.1) / base.sum()
    got = per_step_ratio(on, off, within=0.01)
    assert abs(got["ratio"] - truth) < 0.002 and got["low"] <= truth <= got["high"]
    sums = sorted(sum(a) / sum(b) for a, b in zip(on, off))  # whole-run ratios, paired
    assert got["high"] - got["low"] < sums[-1] - sums[0]
    assert per_step_ratio(on[:2], off[:2], within=0.01)["low"] is None  # too few runs for an interval


@pytest.mark.system
def test_bench_profile_reports_phases_modules_and_ops():
    proc = run_cli(
        "-m",
        "experiments",
        "bench",
        "profile",
        "--json",
        "--steps-per-round",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "4",
        "--frozen",
        "2",
        *tiny_sets(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["frozen"] == 2 and out["threads"] == 1
    assert set(out["phases_ms"]) == {"data+masking", "forward+losses", "backward", "optimizer", "other"}
    assert {"blocks.0", "blocks.3", "decoder_blocks.0", "pixel_head"} <= set(out["modules_forward_ms"])
    assert out["top_ops"]["backward"] and all(o["op"].startswith("aten::") for o in out["top_ops"]["forward+losses"])


def test_bench_data_times_each_dataset() -> None:
    """The timing that used to be asserted in test_data is a bench; here only that it runs."""
    from experiments.bench.data import bench_data

    out = bench_data(repeats=1, batch=4)
    assert set(out) == {"moving_digits", "photo_pans"} and all(v > 0 for v in out.values())


@pytest.mark.system  # heavy in process: the slowest fast-tier test, a bench smoke like the CLI ones above
def test_bench_monitor_and_own_freezing_run() -> None:
    """The own-loop benches, tiny: they run and report their ratios (timings are never asserted)."""
    import torch

    from experiments.bench.monitor import bench_monitor
    from experiments.bench.own_freezing import bench_own_freezing

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mon = bench_monitor("vit", steps=6, every=3, repeats=1)
        frz = bench_own_freezing("vit", rounds=1, steps_per_round=1, warmup=0, repeats=1, every=2, steps=12)
    finally:
        torch.set_num_threads(threads)
    assert mon["ratio"] > 0 and mon["in_calls_ratio"] >= 1 and len(mon["on_all_ms"]) == 1 == len(mon["ratios"])
    assert mon["warm_up_ratio"] > 0  # the warm-up repeat ran and is reported apart
    assert [r["frozen"] for r in frz["per_k"]] == [0, 1, 2, 3] and frz["per_k"][0]["flop_ratio"] == 1
    assert frz["schedule"]["steps"] == 12 and 0 < frz["schedule"]["flop_ratio"] <= 1
