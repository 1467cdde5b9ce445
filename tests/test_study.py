"""``experiments study`` on a tiny budget: every claim, figure and artifact is produced."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from tests.helpers import run_cli, tiny_sets


@pytest.mark.system
def test_tiny_study_produces_every_claim_and_figure(tmp_path, store) -> None:
    sets = tiny_sets(**{"train.steps": 12, "probe.every": 2, "train.checkpoint_every": 2, "model.depth": 4})
    out = tmp_path / "study"
    proc = run_cli(
        "-m",
        "experiments",
        "study",
        "--seeds",
        "0,1",
        *sets,
        "--tasks",
        "digit,depth",
        "--out",
        str(out),
        "--tracking-uri",
        store,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    claims = results["claims"]
    assert set(claims) == {
        "S0_pretraining_matters",
        "S1_depth_order",
        "S2_cheap_rules_vs_freeze_test",
        "S3_compute",
        "S4_collapse",
    }
    assert results["seeds"] == [0, 1]
    for key in ("eval/digit/acc", "eval/digit/linear_acc", "eval/depth/absrel"):
        s0 = claims["S0_pretraining_matters"]["metrics"][key]
        assert s0["n"] == 2 and s0["ci_low"] is not None and s0["verdict"] in ("held", "not held", "inconclusive")
    for rule in ("posthoc", "online", "gradnorm"):
        assert rule in claims["S1_depth_order"]["rules"] and rule in claims["S2_cheap_rules_vs_freeze_test"]["rules"]
    grid = claims["S2_cheap_rules_vs_freeze_test"]["freeze_cost"]["mean_ratio"]
    assert len(grid) == 3 and all(len(row) == 3 for row in grid.values())  # small: L = 1, 2, 3 x 3 steps T
    assert "tolerance" in claims["S2_cheap_rules_vs_freeze_test"]["freeze_cost"]
    # by default block 0 alone is tested too, at the grid's 3 steps, over both seeds
    variants = results["freeze_test_variants"]
    assert {(r["variant"], r["x"]) for r in variants} == {("block", 0), ("prefix", 1), ("prefix", 2), ("prefix", 3)}
    assert len({r["T"] for r in variants if r["variant"] == "block"}) == 3
    assert all(r["n"] == 2 for r in variants)
    s3 = claims["S3_compute"]["methods"]
    assert set(s3) == {"freeze_only", "layerlock"} and s3["freeze_only"]["flop_saving"]["n"] == 2
    assert set(claims["S4_collapse"]["methods"]) == {"mae", "layerlock", "latent_naive"}  # small: no ablation
    figures = {p.stem for p in (out / "figures").glob("*.html")}
    assert figures == set(results["figures"]) and len(figures) == 6
    assert (out / "figures" / "plotly.min.js").exists()  # the pages open offline
    report = (out / "report.md").read_text()
    for section in ("S0", "S1", "S2", "S3", "S4"):
        assert f"## {section} " in report
    # logged to MLflow: every trained run carries the study tag; the study run holds the outputs
    study_run = proc.stdout.strip().splitlines()[-1]
    link = f"http://127.0.0.1:8501/study?study={results['study_id']}"
    assert link in proc.stdout.strip().splitlines()[-2]  # the dashboard's Study page on this study
    client = MlflowClient(store)
    run = client.get_run(study_run)
    assert run.data.tags["layerlock.method"] == "study"
    names = {f.path for f in client.list_artifacts(study_run, "study")}
    assert {"study/report.md", "study/results.json", "study/figures"} <= names
    for method, by_seed in results["runs"].items():
        tags = client.get_run(by_seed["0"]).data.tags
        assert tags["layerlock.study"] == results["study_id"] and tags["layerlock.group"].endswith(method)


@pytest.mark.system
def test_study_bad_input_exits_2(store) -> None:
    proc = run_cli("-m", "experiments", "study", "--seeds", "0,x", "--tracking-uri", store)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    proc = run_cli("-m", "experiments", "study", "--set", "objective.name=layerlock", "--tracking-uri", store)
    assert proc.returncode == 2 and "must be an MAE" in proc.stderr
