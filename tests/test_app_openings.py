"""Where the pages open after a demo or a study, the Study page, and the CSV exports.

Pure functions first (which runs make up the latest demo or study; the export frames), then the
pages in AppTest on synthetic stores: a one-seed demo (newest) beside an older unrelated run, a
two-seed study, and a store whose newest run belongs to no demo (today's defaults).
"""

from __future__ import annotations

import io as textio
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from analysis import io, schema
from analysis.records import RUN_COLUMNS
from analysis.testing import create_run_from_frames, synthetic_history
from app.views import export, state
from app.views import study as sv
from tests.helpers import HOME, TIMEOUT, add_bundle_runs, assert_clean, frame_with, open_page, synthetic_study_results

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
DEMO, STUDY = "demo-20260101-120000", "study-20260102-090000"
T0 = 1_700_000_000_000


# ----------------------------------------------------------------------------- pure: which runs a demo is


def frame(rows: list[dict]) -> pd.DataFrame:
    """A run list as io.list_runs returns it (newest first)."""
    base = {c: None for c in RUN_COLUMNS} | {"status": "FINISHED", "parent": None}
    out = pd.DataFrame([{**base, **r} for r in rows], columns=RUN_COLUMNS)
    out["start_time"] = pd.to_datetime(out["start_time"], unit="s")
    return out.sort_values("start_time", ascending=False).reset_index(drop=True)


def demo_rows(bid: str, seeds: list[int], t: int, roles=("mae", "layerlock", "latent_naive")) -> list[dict]:
    return [
        {"run_id": f"{bid}/{role}/{s}", "method": role, "group": f"{bid}-{role}", "seed": s, "start_time": t + i}
        for i, (role, s) in enumerate((r, s) for r in roles for s in seeds)
    ]


def test_latest_bundle_is_the_demo_of_the_newest_run() -> None:
    older = demo_rows("demo-20250101-000000", [0], 0)
    runs = frame([*older, *demo_rows(DEMO, [1, 0], 100), {"run_id": "lone", "method": "mae", "start_time": 50}])
    found = state.bundles(runs)
    assert list(found) == [DEMO, "demo-20250101-000000"]  # newest first
    latest = state.latest_bundle(runs)
    assert latest is not None and latest.kind == "demo" and latest.id == DEMO
    assert latest.runs["mae"] == [f"{DEMO}/mae/0", f"{DEMO}/mae/1"]  # seed order
    assert latest.mae == f"{DEMO}/mae/0" and latest.seeds == 2
    assert state.compare_opening(latest) == ([f"{DEMO}-mae", f"{DEMO}-layerlock", f"{DEMO}-latent_naive"], [])
    one = state.bundles(runs)["demo-20250101-000000"]
    assert state.compare_opening(one) == ([], ["demo-20250101-000000/mae/0", *[r["run_id"] for r in older[1:]]])


def test_no_bundle_when_a_newer_run_is_not_part_of_it() -> None:
    runs = frame([*demo_rows(DEMO, [0], 100), {"run_id": "later", "method": "mae", "start_time": 200}])
    assert DEMO in state.bundles(runs) and state.latest_bundle(runs) is None


def test_bundles_need_a_demo_id_or_a_study_and_finished_runs() -> None:
    plain = [  # `--seeds` groups ("objective-dataset-hash") and a group that merely ends in -mae
        {"run_id": "a", "method": "mae", "group": "pixel-moving_digits-1234abcd", "seed": 0, "start_time": 1},
        {"run_id": "b", "method": "mae", "group": "mything-mae", "seed": 0, "start_time": 2},
    ]
    assert state.bundles(frame(plain)) == {}
    study = [  # a study named by --out: known by its summary run's name
        {"run_id": "s", "method": "study", "name": "mystudy", "start_time": 9},
        {"run_id": "m", "method": "mae", "group": "mystudy-mae", "seed": 0, "start_time": 3},
        {"run_id": "n", "method": "layerlock", "group": "mystudy-layerlock", "seed": 0, "start_time": 4},
        {
            "run_id": "x",
            "method": "layerlock",
            "group": "mystudy-layerlock",
            "seed": 1,
            "start_time": 5,
            "status": "FAILED",
        },
    ]
    b = state.latest_bundle(frame(study))
    assert b is not None and b.kind == "study" and b.runs == {"mae": ["m"], "layerlock": ["n"]}
    no_mae = demo_rows(DEMO, [0], 0, roles=("layerlock",))
    assert state.bundles(frame(no_mae)) == {}  # nothing to open on


# ----------------------------------------------------------------------------- pure: exports


def test_param_table_only_what_differs() -> None:
    params = {"a": {"lr": "0.001", "seed": "0", "depth": "4"}, "b": {"lr": "0.001", "seed": "1"}}
    full = export.param_table(params)
    assert list(full["param"]) == ["depth", "lr", "seed"] and list(full.columns) == ["param", "a", "b"]
    differs = export.param_table(params, only_differs=True)
    assert list(differs["param"]) == ["depth", "seed"]  # a param missing from one run differs
    assert differs.set_index("param").loc["seed", "b"] == "1"


def test_curves_frame_states_its_smoothing_and_keeps_group_means() -> None:
    run = pd.DataFrame({"step": [0, 2], "x": [0.0, 2.0], "y": [1.0, 0.5]})
    mean = pd.DataFrame({"step": [0, 2], "x": [0.0, 2.0], "mean": [1.0, 0.6], "sd": [0.0, 0.1], "lo": [1.0, 0.5]})
    mean = mean.assign(hi=[1.0, 0.7], n=[2, 2])
    out = export.curves_frame(
        {"G": mean, "r": run}, {"G": {"r1": run, "r2": run}, "r": {"r": run}}, "train/loss", "step", 5
    )
    assert set(out["smoothing"]) == {"rolling mean over 5 logged points"} and set(out["y_metric"]) == {"train/loss"}
    assert (out["kind"] == "group_mean").sum() == 2 and (out["kind"] == "run").sum() == 6  # a group of one: no mean row
    back = pd.read_csv(textio.BytesIO(export.to_csv(out)))
    assert back.loc[back["kind"] == "group_mean", "y"].tolist() == [1.0, 0.6]


# ----------------------------------------------------------------------------- pure: the Study page's parts


def test_study_parts_cover_every_claim() -> None:
    runs = {"mae": ["m0", "m1"], "layerlock": ["l0", "l1"], "freeze_only": ["f0", "f1"], "latent_naive": ["n0", "n1"]}
    results = synthetic_study_results(STUDY, runs, [0, 1])
    results["freeze_test_children"] = {"0": ["c0"], "1": ["c1"]}
    for key, claim in results["claims"].items():
        rows = sv.claim_rows(key, claim)
        assert not rows.empty and rows["estimate [95% interval] (N)"].str.contains(r"\(N=2\)").all(), key
        figs = sv.claim_figures(key, claim)
        assert figs and all(len(f.data) for f in figs), key
    assert sv.claim_runs(results, "S3_compute") == ["m0", "m1", "f0", "f1", "l0", "l1"]
    assert sv.claim_runs(results, "S2_cheap_rules_vs_freeze_test") == ["m0", "m1", "c0", "c1"]
    assert sv.claim_runs(results, "S4_collapse", known={"m0", "n1"}) == ["m0", "n1"]  # deleted runs left out


# ----------------------------------------------------------------------------- pages


def _store(folder: Path) -> str:
    return f"sqlite:///{folder}/mlflow.db"


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("demo-store")
    uri = _store(folder)
    lone = create_run_from_frames(  # older than the demo: not its baseline
        "layerlock",
        uri=uri,
        artifact_root=(folder / "artifacts").as_uri(),
        history=synthetic_history(12, 2, seed=5),
        params={"train.seed": 0, "train.steps": 12},
        run_name="older",
        tags={io.TAG_METHOD: "mae", io.TAG_DATASET: "moving_digits"},
        start_time=T0,
    )
    demo = add_bundle_runs(uri, folder, DEMO, [0], T0 + 10)
    return uri, demo, lone


@pytest.fixture(scope="module")
def study_store(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("study-store")
    uri = _store(folder)
    older = add_bundle_runs(uri, folder, "demo-20250101-000000", [0], T0, roles=("mae", "layerlock"))
    study = add_bundle_runs(
        uri, folder, STUDY, [0, 1], T0 + 100, roles=("mae", "layerlock", "latent_naive"), study=True
    )
    return uri, study, older


def _at(uri: str, tmp_path: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LAYERLOCK_RUNS_DIR", str(tmp_path / "runs"))
    return AppTest.from_file(HOME, default_timeout=TIMEOUT)


def test_after_a_demo_pages_open_on_its_mae_and_compare_on_all_of_it(demo_store, tmp_path, monkeypatch) -> None:
    uri, demo, lone = demo_store
    _at(uri, tmp_path, monkeypatch)
    at = open_page("compare")
    assert_clean(at)
    order = ["mae", "layerlock", "latent_scheduled", "latent_naive", "freeze_only"]
    assert at.multiselect(key="cmp_runs").value == [demo.runs[r][0] for r in order]
    assert at.multiselect(key="cmp_groups").value == []
    assert at.selectbox(key="cmp_baseline").value == demo.runs["mae"][0]
    for page, key in (("convergence", "conv_run"), ("schedule", "sched_run")):
        at = open_page(page, at)
        assert_clean(at)
        assert at.selectbox(key=key).value == demo.runs["mae"][0], page
    # the parameter table shows only what differs by default: objective.name, not train.steps
    at = open_page("compare", at)
    params = frame_with(at, "param")
    assert "objective.name" in set(params["param"]) and "train.steps" not in set(params["param"])
    at.toggle(key="cmp_params_differ").set_value(False).run()
    assert "train.steps" in set(frame_with(at, "param")["param"])
    assert at.get("download_button")  # curves and parameters


def test_a_link_opens_the_named_demo_and_ignores_unknown_ids(study_store, tmp_path, monkeypatch) -> None:
    uri, study, older = study_store
    at = _at(uri, tmp_path, monkeypatch)
    at.query_params["demo"] = older.id  # not the latest bundle: the link picks it
    at.run()
    at = open_page("compare", at)
    assert_clean(at)
    assert at.multiselect(key="cmp_runs").value == [older.runs["mae"][0], older.runs["layerlock"][0]]
    at = open_page("convergence", at)
    assert at.selectbox(key="conv_run").value == older.runs["mae"][0]

    at = _at(uri, tmp_path, monkeypatch)
    at.query_params["demo"] = "../../etc/passwd"
    at.run()
    at = open_page("compare", at)  # unknown id: the latest (the study, two seeds: its groups)
    assert_clean(at)
    assert at.multiselect(key="cmp_groups").value == [f"{STUDY}-mae", f"{STUDY}-layerlock", f"{STUDY}-latent_naive"]
    assert at.multiselect(key="cmp_runs").value == []


def test_study_page_reads_claims_figures_and_links_runs(study_store, tmp_path, monkeypatch) -> None:
    uri, study, _ = study_store
    at = _at(uri, tmp_path, monkeypatch)
    at.query_params["study"] = STUDY
    at.run()
    at = open_page("study", at)
    assert_clean(at)
    assert at.selectbox(key="study_pick").value == study.summary
    heads = [h.value for h in at.subheader]
    assert len(heads) == 5 and heads[0].startswith("S0") and any("held" in h for h in heads)
    rows = frame_with(at, "figure", "estimate [95% interval] (N)", "verdict")
    assert rows["estimate [95% interval] (N)"].str.contains(r"\[.*\] \(N=2\)").all()
    assert len(at.get("plotly_chart")) == 6  # S2 has two figures
    links = at.get("page_link")
    assert len(links) == 10
    # a claim's runs, selected through the same ?runs= link, open on the Runs page
    ids = sv.claim_runs({"runs": {m: dict(enumerate(r)) for m, r in study.runs.items()}}, "S3_compute")
    at = _at(uri, tmp_path, monkeypatch)
    at.query_params["runs"] = ",".join([*ids, "nope"])
    at.query_params["grouped"] = "1"
    at.run()
    at = open_page("compare", at)
    assert_clean(at)
    assert at.multiselect(key="cmp_groups").value == [f"{STUDY}-mae", f"{STUDY}-layerlock"]
    assert at.multiselect(key="cmp_runs").value == []


def test_without_a_demo_pages_keep_the_most_recent_run(demo_store, tmp_path, monkeypatch) -> None:
    uri, demo, lone = demo_store
    import shutil

    folder = Path(uri.removeprefix("sqlite:///")).parent
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    curi = _store(copy)
    newer = create_run_from_frames(
        "layerlock",
        uri=curi,
        history=synthetic_history(12, 2, seed=7),
        params={"train.seed": 0, "train.steps": 12},
        run_name="newer",
        tags={io.TAG_METHOD: "layerlock", io.TAG_DATASET: "moving_digits"},
        start_time=T0 + 1000,
    )
    at = _at(curi, tmp_path, monkeypatch)
    at = open_page("convergence")
    assert_clean(at)
    assert at.selectbox(key="conv_run").value == newer
    at = open_page("compare", at)
    runs = at.multiselect(key="cmp_runs").value
    assert runs[0] == newer and len(runs) == 3  # recent runs, one per method first


# ----------------------------------------------------------------------------- CSV round trip against the store


def test_runs_and_block_metrics_csv_round_trip_the_store(demo_store) -> None:
    uri, demo, _ = demo_store
    runs = io.list_runs(uri)
    back = pd.read_csv(textio.BytesIO(export.to_csv(runs)))
    assert list(back["run_id"]) == list(runs["run_id"])
    for col in ("final_loss", "steps", "seed"):
        np.testing.assert_array_equal(back[col].to_numpy(dtype=float), runs[col].to_numpy(dtype=float))
    mlflow_loss = {r: io.get_run(r, uri).metrics[schema.LOSS] for r in runs["run_id"]}
    assert dict(zip(back["run_id"], back["final_loss"], strict=True)) == mlflow_loss  # bit for bit

    rid = demo.runs["mae"][0]
    layer = io.load_layer_metrics(rid, uri)
    blocks = export.block_metrics_frame(layer)
    read = pd.read_csv(textio.BytesIO(export.to_csv(blocks)))
    merged = read.merge(layer, on=["metric", "block", "step"], suffixes=("_csv", "_store"))
    assert len(merged) == len(layer) and (merged["value_csv"] == merged["value_store"]).all()
    assert (layer["value"] % 1 != 0).any()  # real fractions, not integers that trivially survive


def test_dashboard_link_is_a_page_with_its_query() -> None:
    from experiments.demo import dashboard_link

    assert dashboard_link("compare", demo=DEMO) == f"http://127.0.0.1:8501/compare?demo={DEMO}"
    assert dashboard_link("study") == "http://127.0.0.1:8501/study"
