"""io, compare_runs, freeze_test_grid and the CLI against one throwaway sqlite MLflow runs.

Creating a store costs a few seconds, so one module-scoped store holds every run:
an MAE run whose layer metrics are metric history only, a LayerLock run with the same layer
metrics as a parquet artifact only (and fewer FLOPs), and three freeze-test children of the MAE run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from analysis import io, records
from analysis.__main__ import main
from analysis.compare import COMPARE_PARTS, FINAL_LOSS_PARTS, compare_runs, freeze_test_grid
from analysis.schedule import validate_schedule
from analysis.testing import (
    create_run_from_frames,
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
# MLflow's own store setup trips a SQLAlchemy deprecation; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@dataclass(frozen=True)
class SyntheticRuns:
    uri: str
    tmp: Path
    layer_df: pd.DataFrame
    mae: str
    ll: str
    mae_history: pd.DataFrame
    ll_history: pd.DataFrame
    children: dict[tuple[int, int], str]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRuns:
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    root = (tmp / "artifacts").as_uri()  # keep artifacts inside the temporary folder
    layer_df = synthetic_layer_metrics(TRUTH, total_steps=TOTAL, probe_every=PROBE, log_every=LOG)
    mae_h = synthetic_history(TOTAL, LOG, MODEL, None, seed=1)
    ll_h = synthetic_history(TOTAL, LOG, MODEL, SCHEDULE, seed=2)
    evals = pd.DataFrame({"run_id": "x", "step": [TOTAL], "metric": ["eval/digit/acc"], "value": [0.8]})
    common = {"uri": uri, "artifact_root": root, "params": PARAMS}
    mae = create_run_from_frames(
        "layerlock",
        layer_df=layer_df,
        history=pd.concat([mae_h, evals]),
        layer_artifact=False,
        tags={io.TAG_METHOD: "mae", io.TAG_DATASET: "moving_digits"},
        json_artifacts={io.FLOP_MODEL_ARTIFACT: MODEL},
        run_name="mae",
        **common,
    )
    ll = create_run_from_frames(
        "layerlock",
        layer_df=layer_df,
        history=pd.concat([ll_h, evals.assign(value=0.85)]),
        layer_history=False,
        tags={io.TAG_METHOD: "layerlock", io.TAG_DATASET: "moving_digits", io.TAG_SCHEDULE_SOURCE: mae},
        json_artifacts={io.FLOP_MODEL_ARTIFACT: MODEL, io.SCHEDULE_ARTIFACT: SCHEDULE},
        run_name="ll",
        **common,
    )
    children = {}
    # Freeze tests (L blocks at step T) in another experiment; final loss = ratio x the MAE's.
    for (blocks, step), ratio in {(1, 200): 1.0, (2, 200): 1.01, (4, 200): 1.2}.items():
        h = mae_h[mae_h["metric"] == "train/loss"].assign(value=lambda d, r=ratio: d["value"] * r)
        children[(blocks, step)] = create_run_from_frames(
            "freeze-tests",
            history=h,
            uri=uri,
            artifact_root=root,
            params=PARAMS,
            tags={
                io.TAG_METHOD: "freeze_test",
                io.TAG_PARENT: mae,
                io.TAG_FREEZE_STEP: str(step),
                io.TAG_FREEZE_BLOCKS: str(blocks),
            },
        )
    return SyntheticRuns(uri, tmp, layer_df, mae, ll, mae_h, ll_h, children)


def test_resolve_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert io.resolve_tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert io.resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert io.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_get_run_and_unknown_ids(runs: SyntheticRuns, tmp_path: Path) -> None:
    record = io.get_run(runs.mae, runs.uri)
    assert record.run_id == runs.mae and record.experiment == "layerlock" and record.status == "FINISHED"
    assert record.method == "mae" and record.param_int("train.steps") == TOTAL
    assert record.metrics["eval/digit/acc"] == 0.8 and record.name == "mae"
    assert io.get_run(runs.mae, runs.uri).params["model.depth"] == str(N_BLOCKS)
    with pytest.raises(RunNotFoundError, match=f"run not found: {MISSING}"):
        io.get_run(MISSING, runs.uri)
    with pytest.raises(RunNotFoundError):
        io.load_layer_metrics("", runs.uri)
    # A missing sqlite file is reported, not created as a side effect of reading.
    missing_db = tmp_path / "none.db"
    with pytest.raises(RunNotFoundError, match="no such database"):
        io.get_run(runs.mae, f"sqlite:///{missing_db}")
    assert not missing_db.exists()
    empty = io.list_runs(f"sqlite:///{missing_db}")
    assert empty.empty and list(empty.columns) == records.RUN_COLUMNS


def test_list_runs_and_children(runs: SyntheticRuns) -> None:
    listed = io.list_runs(runs.uri)
    assert set(listed["run_id"]) == {runs.mae, runs.ll, *runs.children.values()}
    assert list(listed.columns[: len(records.RUN_COLUMNS)]) == records.RUN_COLUMNS
    ll = listed.set_index("run_id").loc[runs.ll]
    assert ll["method"] == "layerlock" and ll["schedule_source"] == runs.mae and ll["steps"] == TOTAL
    assert ll["eval/digit/acc"] == 0.85
    assert set(io.list_runs(runs.uri, experiment_names=["freeze-tests"])["run_id"]) == set(runs.children.values())

    kids = io.find_children(runs.mae, runs.uri)
    assert list(zip(kids["freeze_blocks"], kids["freeze_step"], strict=True)) == [(1, 200), (2, 200), (4, 200)]
    assert io.find_children(runs.ll, runs.uri).empty


def test_layer_metrics_same_frame_from_history_and_artifact(runs: SyntheticRuns) -> None:
    from_history = io.load_layer_metrics(runs.mae, runs.uri)  # this run has no artifact
    from_artifact = io.load_layer_metrics(runs.ll, runs.uri)  # this run has no per-block history
    assert list(from_history.columns) == records.LAYER_COLUMNS
    assert (from_history["run_id"] == runs.mae).all()
    pd.testing.assert_frame_equal(from_history.drop(columns="run_id"), from_artifact.drop(columns="run_id"))
    expected = runs.layer_df.drop(columns="run_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(from_history.drop(columns="run_id"), expected, check_dtype=False)
    only = io.load_layer_metrics(runs.ll, runs.uri, metrics=["eff_rank"])
    assert set(only["metric"]) == {"eff_rank"}
    with pytest.raises(LayerLockError, match=r"no layer_metrics\.parquet"):
        io.load_layer_metrics(runs.mae, runs.uri, source="artifact")


def test_history_and_artifacts(runs: SyntheticRuns) -> None:
    h = io.load_history(runs.mae, uri=runs.uri)
    assert list(h.columns) == records.HISTORY_COLUMNS
    assert set(h["metric"]) == set(runs.mae_history["metric"])  # train/* only: no eval/*
    loss = io.load_history(runs.mae, ["train/loss", "train/nope"], runs.uri)
    assert set(loss["metric"]) == {"train/loss"} and len(loss) == TOTAL // LOG
    assert io.load_flop_model(runs.mae, runs.uri) == MODEL
    assert io.load_schedule(runs.ll, runs.uri) == SCHEDULE
    assert io.load_schedule(runs.mae, runs.uri) is None


def test_log_schedule_artifact_round_trip(runs: SyntheticRuns) -> None:
    derived = {"n_blocks": N_BLOCKS, "stages": [{"step": 200, "frozen": 2}], "source": {"run_id": runs.mae}}
    uri = io.log_schedule_artifact(runs.mae, derived, runs.uri)
    assert uri.endswith(io.DERIVED_SCHEDULE_ARTIFACT)
    assert io.load_schedule(runs.mae, runs.uri, artifact_file=io.DERIVED_SCHEDULE_ARTIFACT) == derived
    assert io.load_schedule(runs.mae, runs.uri) is None  # the trained-with schedule is untouched
    with pytest.raises(ScheduleError):
        io.log_schedule_artifact(runs.mae, {"n_blocks": 2, "stages": [{"step": 1, "frozen": 2}]}, runs.uri)


def test_load_run_reads_the_parts_asked_for(runs: SyntheticRuns) -> None:
    only_loss = io.load_run(runs.ll, runs.uri, records.Parts(history=("train/loss",), schedule=True, source=True))
    assert set(only_loss.history["metric"]) == {"train/loss"} and only_loss.schedule == SCHEDULE
    # the schedule's source run (the MAE), with its models: what the run's saving was predicted from
    assert only_loss.source.run_id == runs.mae and only_loss.source.flop_model == MODEL
    assert only_loss.source.time_model is None  # read, and absent: not the same as not read
    for part in ("layers", "flop_model"):
        with pytest.raises(LayerLockError, match=f"{part} was not loaded"):
            getattr(only_loss, part)
    whole = io.load_run(runs.mae, runs.uri)  # default: everything of the run itself
    pd.testing.assert_frame_equal(whole.layers, io.load_layer_metrics(runs.mae, runs.uri))
    assert whole.flop_model == MODEL and whole.schedule is None
    with pytest.raises(LayerLockError, match="source was not loaded"):
        _ = whole.source
    assert list(io.load_runs([runs.mae, runs.ll, runs.mae], runs.uri, records.Parts())) == [runs.mae, runs.ll]


def test_compare_runs(runs: SyntheticRuns) -> None:
    frame = compare_runs(io.load_runs([runs.ll, runs.mae], runs.uri, COMPARE_PARTS).values()).set_index("run_id")
    assert frame.loc[runs.ll, "method"] == "layerlock" and frame.loc[runs.mae, "flop_saving"] == 0.0
    # Cumulative FLOPs are logged through step 590: steps 0-149 at k=0, 150-299 at k=1, 300-590 at k=3.
    per = {int(k): v for k, v in MODEL["per_step"].items()}
    expected = 1 - (150 * per[0] + 150 * per[1] + 291 * per[3]) / (591 * per[0])
    assert frame.loc[runs.ll, "flop_saving"] == pytest.approx(expected)
    for run_id, history in ((runs.ll, runs.ll_history), (runs.mae, runs.mae_history)):
        loss = history[history["metric"] == "train/loss"].sort_values("step")["value"].to_numpy()
        assert frame.loc[run_id, "final_loss"] == pytest.approx(loss[-3:].mean())  # mean of the last 3 logged
    assert frame.loc[runs.ll, "eval/digit/acc"] == 0.85
    assert frame.loc[runs.mae, "eff_rank_mean"] > 10
    with pytest.raises(RunNotFoundError):
        io.load_runs([runs.mae, MISSING], runs.uri, COMPARE_PARTS)


def test_freeze_test_grid(runs: SyntheticRuns) -> None:
    grid = freeze_test_grid(io.load_freeze_test(runs.mae, runs.uri, FINAL_LOSS_PARTS), tol=0.02)
    assert grid.ratio.loc[2, 200] == pytest.approx(1.01)
    assert grid.max_converged_prefix().to_dict() == {200: 2}
    with pytest.raises(LayerLockError, match="no freeze-test children"):
        freeze_test_grid(io.load_freeze_test(runs.ll, runs.uri, FINAL_LOSS_PARTS))


# ----------------------------------------------------------------------------- CLI


def test_cli_in_process(runs: SyntheticRuns, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convergence", "--run", runs.mae, "--json", "--tracking-uri", runs.uri]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = [None if c is None else math.ceil(c / PROBE) * PROBE for c in TRUTH]  # first probe step >= truth
    assert [b["converged_step"] for b in report["blocks"]] == expected

    assert main(["convergence", "--run", runs.mae, "--method", "online", "--tracking-uri", runs.uri]) == 0
    assert "spearman rho" in capsys.readouterr().out

    out = runs.tmp / "sched" / "derived.json"
    argv = ["schedule", "--run", runs.mae, "--out", str(out), "--margin", "10", "--tracking-uri", runs.uri]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written and 0 < written["predicted_flop_saving"] < 1
    validate_schedule(written, total_steps=TOTAL, n_blocks=N_BLOCKS)
    assert written["source"]["run_id"] == runs.mae and written["stages"][0]["step"] == expected[0] + 10

    blocker = runs.tmp / "a_file"
    blocker.write_text("")
    assert main(["schedule", "--run", runs.mae, "--out", str(blocker / "x.json"), "--tracking-uri", runs.uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write --out") and err.count("\n") == 1

    assert main(["compare", runs.mae, runs.ll, "--json", "--tracking-uri", runs.uri]) == 0
    records = json.loads(capsys.readouterr().out)["runs"]
    assert [r["run_id"] for r in records] == [runs.mae, runs.ll]
    assert main(["compare", runs.mae, runs.ll, "--tracking-uri", runs.uri]) == 0
    assert "flop_saving" in capsys.readouterr().out

    assert main(["freeze-grid", "--parent", runs.mae, "--json", "--tracking-uri", runs.uri]) == 0
    assert json.loads(capsys.readouterr().out)["max_converged_prefix"] == {"200": 2}

    # Missing metrics: the freeze-test children log no per-block metrics.
    child = runs.children[(1, 200)]
    assert main(["convergence", "--run", child, "--tracking-uri", runs.uri]) == 2
    assert "no 'cka_final'" in capsys.readouterr().err


def run_analysis_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "analysis", *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
    )


@pytest.mark.system
def test_cli_subprocess_json_and_bad_run_id(runs: SyntheticRuns) -> None:
    # Its time (start-up included) is `python -m experiments bench cli`, not asserted here.
    done = run_analysis_cli("convergence", "--run", runs.mae, "--json", "--tracking-uri", runs.uri)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"run_id", "method", "threshold", "blocks", "spearman_rho", "kendall_tau"} <= set(report)

    bad = run_analysis_cli("convergence", "--run", MISSING, "--json", "--tracking-uri", runs.uri)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith(f"error: run not found: {MISSING}")
