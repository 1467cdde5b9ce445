"""A short demo run end to end: train, derive schedule, LayerLock, naive, freeze-only, evaluate, table."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from tests.helpers import run_cli, tiny_sets

pytestmark = pytest.mark.system  # every test runs the command line


def test_demo_smoke(tmp_path, store):
    sets = tiny_sets(**{"train.steps": 8, "probe.every": 2})
    proc = run_cli(
        "-m",
        "experiments",
        "demo",
        "--steps",
        "8",
        "--probe-every",
        "2",
        *sets,
        "--eval-train-clips",
        "48",
        "--eval-val-clips",
        "16",
        "--out-dir",
        str(tmp_path / "out"),
        "--tracking-uri",
        store,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for name in ("mae", "layerlock", "latent_scheduled", "latent_naive", "freeze_only", "random_init"):
        assert f"\n{name:>12}" in out or f" {name} " in out or f"\n {name}" in out, (name, out)
    assert "streamlit run app/Home.py" in out
    ids = dict(line.strip().split(": ") for line in out.strip().splitlines()[-5:])
    # the last lines link the dashboard's Compare page opened on exactly this demo's runs
    from analysis import io
    from app.views.state import bundles

    link = next(x for x in out.splitlines() if "http://127.0.0.1:8501/compare?demo=" in x)
    demo = bundles(io.list_runs(store))[link.split("?demo=")[1].split()[0]]
    assert demo.kind == "demo" and demo.mae == ids["mae"]
    assert {role: r[0] for role, r in demo.runs.items()} == ids
    client = MlflowClient(store)
    mae = client.get_run(ids["mae"])
    assert mae.data.tags["layerlock.method"] == "mae"
    ll = client.get_run(ids["layerlock"])
    assert ll.data.tags["layerlock.schedule_source"] == ids["mae"]
    assert ll.data.tags["layerlock.method"] == "layerlock"
    assert client.get_run(ids["latent_naive"]).data.tags["layerlock.method"] == "latent_naive"
    for rid in ids.values():
        metrics = client.get_run(rid).data.metrics
        assert {"eval/digit/acc", "eval/direction/acc", "eval/depth/absrel", "eval/depth/delta1"} <= metrics.keys()
    assert list((tmp_path / "out").glob("schedule_*.json"))
    assert client.get_run(ids["latent_scheduled"]).data.tags["layerlock.method"] == "latent_scheduled"
    # written to a pipe, the demo logs stage lines instead of progress-bar frames
    assert "[demo" in proc.stderr and "\r" not in proc.stderr
    assert "1 seed (0)" in out and "one seed: differences between these rows have no interval" in out
    # the freeze-only run's saving: predicted from the MAE run's time model, beside the measured one
    assert "freeze only: the schedule's saving predicted from the MAE run" in out
    line = next(x for x in out.splitlines() if x.startswith("freeze_only/0"))
    assert f"source {ids['mae'][:8]}: time_model" in line


def test_demo_two_seeds_reports_groups(tmp_path, store):
    sets = tiny_sets(**{"train.steps": 8, "probe.every": 2})
    proc = run_cli(
        "-m",
        "experiments",
        "demo",
        "--steps",
        "8",
        "--probe-every",
        "2",
        *sets,
        "--seeds",
        "0,1",
        "--no-freeze-only",
        "--tasks",
        "digit",
        "--eval-train-clips",
        "32",
        "--eval-val-clips",
        "16",
        "--out-dir",
        str(tmp_path / "out"),
        "--tracking-uri",
        store,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "2 seeds (0, 1)" in out
    assert "(2)" in out  # mean ± sd (N) cells
    assert "95% t interval" in out
    ids = dict(line.strip().split(": ") for line in out.strip().splitlines()[-8:])
    client = MlflowClient(store)
    groups = {client.get_run(ids[f"mae/{s}"]).data.tags["layerlock.group"] for s in (0, 1)}
    assert len(groups) == 1
    assert {client.get_run(ids[f"mae/{s}"]).data.params["train.seed"] for s in (0, 1)} == {"0", "1"}
