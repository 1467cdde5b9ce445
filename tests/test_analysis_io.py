"""io, compare_runs, freeze_test_grid and the CLI against one throwaway sqlite MLflow store.

Creating a store costs a few seconds, so one module-scoped store holds every run:
an MAE run whose layer metrics are metric history only, a LayerLock run with the same layer
metrics as a parquet artifact only (and fewer FLOPs), and three freeze-test children of the MAE run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from analysis import io
from analysis.__main__ import main
from analysis.compare import compare_runs, final_value, freeze_test_grid
from analysis.convergence import posthoc_convergence
from analysis.flops import schedule_flops
from analysis.schedule import validate_schedule
from analysis.synthetic import (
    synthetic_flop_model,
    synthetic_history,
    synthetic_layer_metrics,
)
from core.errors import LayerLockError, RunNotFoundError, ScheduleError

REPO = Path(__file__).resolve().parents[1]
TOTAL, PROBE, LOG = 600, 50, 10
TRUTH = [120, 180, 260, 330, 410, 470, None]
N_BLOCKS = len(TRUTH)
MODEL = synthetic_flop_model(N_BLOCKS)
SCHEDULE = {"n_blocks": N_BLOCKS, "stages": [{"step": 150, "frozen": 1}, {"step": 300, "frozen": 3}], "source": {}}
PARAMS = {"model.depth": N_BLOCKS, "train.steps": TOTAL, "train.batch_size": 32, "probe.every": PROBE}
MISSING = "0" * 32


@dataclass(frozen=True)
class Store:
    uri: str
    tmp: Path
    layer_df: pd.DataFrame
    mae: str
    ll: str
    mae_history: pd.DataFrame
    ll_history: pd.DataFrame
    children: dict[tuple[int, int], str]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    root = (tmp / "artifacts").as_uri()  # keep artifacts inside the temporary folder
    layer_df = synthetic_layer_metrics(TRUTH, total_steps=TOTAL, probe_every=PROBE, log_every=LOG)
    mae_h = synthetic_history(TOTAL, LOG, MODEL, None, seed=1)
    ll_h = synthetic_history(TOTAL, LOG, MODEL, SCHEDULE, seed=2)
    evals = pd.DataFrame({"run_id": "x", "step": [TOTAL], "metric": ["eval/digit/acc"], "value": [0.8]})
    common = {"uri": uri, "artifact_root": root, "params": PARAMS}
    mae = io.create_run_from_frames(
        "layerlock", layer_df=layer_df, history=pd.concat([mae_h, evals]), layer_artifact=False,
        tags={io.TAG_METHOD: "mae", io.TAG_DATASET: "moving_digits"},
        json_artifacts={io.FLOP_MODEL_ARTIFACT: MODEL}, run_name="mae", **common)
    ll = io.create_run_from_frames(
        "layerlock", layer_df=layer_df, history=pd.concat([ll_h, evals.assign(value=0.85)]), layer_history=False,
        tags={io.TAG_METHOD: "layerlock", io.TAG_DATASET: "moving_digits", io.TAG_SCHEDULE_SOURCE: mae},
        json_artifacts={io.FLOP_MODEL_ARTIFACT: MODEL, io.SCHEDULE_ARTIFACT: SCHEDULE}, run_name="ll", **common)
    children = {}
    # Freeze tests (L blocks at step T) in another experiment; final loss = ratio x the MAE's.
    for (blocks, step), ratio in {(1, 200): 1.0, (2, 200): 1.01, (4, 200): 1.2}.items():
        h = mae_h[mae_h["metric"] == "train/loss"].assign(value=lambda d, r=ratio: d["value"] * r)
        children[(blocks, step)] = io.create_run_from_frames(
            "freeze-tests", history=h, uri=uri, artifact_root=root, params=PARAMS,
            tags={io.TAG_METHOD: "freeze_test", io.TAG_PARENT: mae,
                  io.TAG_FREEZE_STEP: str(step), io.TAG_FREEZE_BLOCKS: str(blocks)})
    return Store(uri, tmp, layer_df, mae, ll, mae_h, ll_h, children)


def test_resolve_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert io.resolve_tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert io.resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert io.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_get_run_and_unknown_ids(store: Store, tmp_path: Path) -> None:
    record = io.get_run(store.mae, store.uri)
    assert record.run_id == store.mae and record.experiment == "layerlock" and record.status == "FINISHED"
    assert record.method == "mae" and record.param_int("train.steps") == TOTAL
    assert record.metrics["eval/digit/acc"] == 0.8 and record.name == "mae"
    assert io.load_params(store.mae, store.uri)["model.depth"] == str(N_BLOCKS)
    with pytest.raises(RunNotFoundError, match=f"run not found: {MISSING}"):
        io.get_run(MISSING, store.uri)
    with pytest.raises(RunNotFoundError):
        io.load_layer_metrics("", store.uri)
    # A missing sqlite file is reported, not created as a side effect of reading.
    missing_db = tmp_path / "none.db"
    with pytest.raises(RunNotFoundError, match="no such database"):
        io.get_run(store.mae, f"sqlite:///{missing_db}")
    assert not missing_db.exists()
    empty = io.list_runs(f"sqlite:///{missing_db}")
    assert empty.empty and list(empty.columns) == io.RUN_COLUMNS


def test_list_runs_and_children(store: Store) -> None:
    runs = io.list_runs(store.uri)
    assert set(runs["run_id"]) == {store.mae, store.ll, *store.children.values()}
    assert list(runs.columns[: len(io.RUN_COLUMNS)]) == io.RUN_COLUMNS
    ll = runs.set_index("run_id").loc[store.ll]
    assert ll["method"] == "layerlock" and ll["schedule_source"] == store.mae and ll["steps"] == TOTAL
    assert ll["eval/digit/acc"] == 0.85
    assert set(io.list_runs(store.uri, experiment_names=["freeze-tests"])["run_id"]) == set(store.children.values())

    kids = io.find_children(store.mae, store.uri)
    assert list(zip(kids["freeze_blocks"], kids["freeze_step"], strict=True)) == [(1, 200), (2, 200), (4, 200)]
    assert io.find_children(store.ll, store.uri).empty


def test_layer_metrics_same_frame_from_history_and_artifact(store: Store) -> None:
    from_history = io.load_layer_metrics(store.mae, store.uri)  # this run has no artifact
    from_artifact = io.load_layer_metrics(store.ll, store.uri)  # this run has no per-block history
    assert list(from_history.columns) == io.LAYER_COLUMNS
    assert (from_history["run_id"] == store.mae).all()
    pd.testing.assert_frame_equal(from_history.drop(columns="run_id"), from_artifact.drop(columns="run_id"))
    expected = store.layer_df.drop(columns="run_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(from_history.drop(columns="run_id"), expected, check_dtype=False)
    only = io.load_layer_metrics(store.ll, store.uri, metrics=["eff_rank"])
    assert set(only["metric"]) == {"eff_rank"}
    with pytest.raises(LayerLockError, match=r"no layer_metrics\.parquet"):
        io.load_layer_metrics(store.mae, store.uri, source="artifact")


def test_history_and_artifacts(store: Store) -> None:
    h = io.load_history(store.mae, uri=store.uri)
    assert list(h.columns) == io.HISTORY_COLUMNS
    assert set(h["metric"]) == set(store.mae_history["metric"])  # train/* only: no eval/*
    loss = io.load_history(store.mae, ["train/loss", "train/nope"], store.uri)
    assert set(loss["metric"]) == {"train/loss"} and len(loss) == TOTAL // LOG
    assert io.load_flop_model(store.mae, store.uri) == MODEL
    assert io.load_schedule(store.ll, store.uri) == SCHEDULE
    assert io.load_schedule(store.mae, store.uri) is None


def test_log_schedule_artifact_round_trip(store: Store) -> None:
    derived = {"n_blocks": N_BLOCKS, "stages": [{"step": 200, "frozen": 2}], "source": {"run_id": store.mae}}
    uri = io.log_schedule_artifact(store.mae, derived, store.uri)
    assert uri.endswith(io.DERIVED_SCHEDULE_ARTIFACT)
    assert io.load_schedule(store.mae, store.uri, artifact_file=io.DERIVED_SCHEDULE_ARTIFACT) == derived
    assert io.load_schedule(store.mae, store.uri) is None  # the trained-with schedule is untouched
    with pytest.raises(ScheduleError):
        io.log_schedule_artifact(store.mae, {"n_blocks": 2, "stages": [{"step": 1, "frozen": 2}]}, store.uri)


def test_compare_runs(store: Store) -> None:
    frame = compare_runs([store.ll, store.mae], store.uri).set_index("run_id")
    assert frame.loc[store.ll, "method"] == "layerlock" and frame.loc[store.mae, "flop_saving"] == 0.0
    logged = TOTAL - LOG + 1  # cumulative FLOPs are logged through step 590
    expected = 1 - schedule_flops(SCHEDULE, MODEL, logged) / (logged * MODEL["per_step"]["0"])
    assert frame.loc[store.ll, "flop_saving"] == pytest.approx(expected)
    assert frame.loc[store.ll, "final_loss"] == pytest.approx(final_value(store.ll_history))
    assert frame.loc[store.mae, "final_loss"] == pytest.approx(final_value(store.mae_history))
    assert frame.loc[store.ll, "eval/digit/acc"] == 0.85
    assert frame.loc[store.mae, "eff_rank_mean"] > 10
    with pytest.raises(RunNotFoundError):
        compare_runs([store.mae, MISSING], store.uri)


def test_freeze_test_grid(store: Store) -> None:
    grid = freeze_test_grid(store.mae, store.uri, tol=0.02)
    assert grid.ratio.loc[2, 200] == pytest.approx(1.01)
    assert grid.max_converged_prefix().to_dict() == {200: 2}
    with pytest.raises(LayerLockError, match="no freeze-test children"):
        freeze_test_grid(store.ll, store.uri)


# ----------------------------------------------------------------------------- CLI

def test_cli_in_process(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convergence", "--run", store.mae, "--json", "--tracking-uri", store.uri]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = posthoc_convergence(store.layer_df)
    assert [b["converged_step"] for b in report["blocks"]] == [None if pd.isna(v) else int(v) for v in expected]

    assert main(["convergence", "--run", store.mae, "--method", "online", "--tracking-uri", store.uri]) == 0
    assert "spearman rho" in capsys.readouterr().out

    out = store.tmp / "sched" / "derived.json"
    argv = ["schedule", "--run", store.mae, "--out", str(out), "--margin", "10", "--tracking-uri", store.uri]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written and 0 < written["predicted_flop_saving"] < 1
    validate_schedule(written, total_steps=TOTAL, n_blocks=N_BLOCKS)
    assert written["source"]["run_id"] == store.mae and written["stages"][0]["step"] == int(expected[0]) + 10

    blocker = store.tmp / "a_file"
    blocker.write_text("")
    assert main(["schedule", "--run", store.mae, "--out", str(blocker / "x.json"), "--tracking-uri", store.uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write --out") and err.count("\n") == 1

    assert main(["compare", store.mae, store.ll, "--json", "--tracking-uri", store.uri]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in records] == [store.mae, store.ll]
    assert main(["compare", store.mae, store.ll, "--tracking-uri", store.uri]) == 0
    assert "flop_saving" in capsys.readouterr().out

    assert main(["freeze-grid", "--parent", store.mae, "--json", "--tracking-uri", store.uri]) == 0
    assert json.loads(capsys.readouterr().out)["max_converged_prefix"] == {"200": 2}

    # Missing metrics: the freeze-test children log no per-block metrics.
    child = store.children[(1, 200)]
    assert main(["convergence", "--run", child, "--tracking-uri", store.uri]) == 2
    assert "no 'cka_final'" in capsys.readouterr().err


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "analysis", *args], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_cli_subprocess_json_and_bad_run_id(store: Store) -> None:
    start = time.perf_counter()
    done = run_cli("convergence", "--run", store.mae, "--json", "--tracking-uri", store.uri)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"run_id", "method", "threshold", "blocks", "spearman_rho", "kendall_tau"} <= set(report)
    assert elapsed < 10, f"CLI took {elapsed:.1f} s"

    bad = run_cli("convergence", "--run", MISSING, "--json", "--tracking-uri", store.uri)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith(f"error: run not found: {MISSING}")
