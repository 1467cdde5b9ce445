"""Groups of seeds on the dashboard (AppTest): the Runs page's grouped table, the Compare page's
group picker, baseline selectbox, band chart and paired-difference table.

The store holds synthetic runs only (no training, so it builds in seconds): an MAE group and a
LayerLock group of three seeds each (the LayerLock schedule counts fewer FLOPs), and one lone
run without a group tag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis import io
from analysis.testing import create_run_from_frames, synthetic_flop_model, synthetic_history, synthetic_layer_metrics
from tests.helpers import HOME, TIMEOUT, assert_clean, frame_with, open_page, point_app_at

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
MAE, LL = "pixel-moving_digits-0000aaaa", "layerlock-moving_digits-0000bbbb"
DEPTH, STEPS = 4, 12
MODEL = synthetic_flop_model(DEPTH)
SCHEDULE = {"n_blocks": DEPTH, "stages": [{"step": 4, "frozen": 1}, {"step": 8, "frozen": 2}], "source": {}}


@dataclass(frozen=True)
class GroupStore:
    uri: str
    runs: dict[str, list[str]]
    lone: str


def build_group_store(folder: Path) -> GroupStore:
    uri = f"sqlite:///{folder}/mlflow.db"
    common = {"uri": uri, "artifact_root": (folder / "artifacts").as_uri()}
    layer_df = synthetic_layer_metrics([4, 8, None, None], total_steps=STEPS, probe_every=4, log_every=2)
    runs: dict[str, list[str]] = {}
    for group, method, schedule, start in ((MAE, "mae", None, 1.0), (LL, "layerlock", SCHEDULE, 0.9)):
        for seed in range(3):
            history = synthetic_history(STEPS, 2, MODEL, schedule, loss_start=start, seed=seed)
            runs.setdefault(group, []).append(
                create_run_from_frames(
                    "layerlock",
                    history=history,
                    layer_df=layer_df,
                    run_name=f"{method}-seed{seed}",
                    params={"train.seed": seed, "train.steps": STEPS, "model.depth": DEPTH},
                    tags={io.TAG_METHOD: method, io.TAG_DATASET: "moving_digits", io.TAG_GROUP: group},
                    **common,
                )
            )
    lone = create_run_from_frames(
        "layerlock",
        history=synthetic_history(STEPS, 2, MODEL, seed=9),
        params={"train.seed": 0, "train.steps": STEPS},
        run_name="lone",
        tags={io.TAG_METHOD: "mae", io.TAG_DATASET: "moving_digits"},
        **common,
    )
    study = create_run_from_frames(
        "layerlock",
        params={"seeds": "0,1,2"},
        run_name="study-x",
        tags={io.TAG_METHOD: "study", "layerlock.study": "study-x"},
        json_artifacts={"study/results.json": {"claims": {}}},
        **common,
    )
    from mlflow import MlflowClient

    MlflowClient(uri).log_text(study, "# LayerLock Lab study study-x\n\n## S1 Depth order\n", "study/report.md")
    return GroupStore(uri, runs, lone)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> GroupStore:
    return build_group_store(tmp_path_factory.mktemp("group-store"))


@pytest.fixture
def env(store: GroupStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GroupStore:
    point_app_at(store.uri, tmp_path, monkeypatch)
    return store


def savings(at: AppTest) -> dict[str, float]:
    """run label -> flop_saving in the Compare page's per-run table."""
    table = frame_with(at, "run", "flop_saving")
    return dict(zip(table["run"], table["flop_saving"], strict=True))


def test_runs_page_groups_runs_by_tag(env: GroupStore) -> None:
    at = open_page("runs")
    assert_clean(at)
    grouped = frame_with(at, "group", "runs", "seeds", "final_loss")
    assert set(grouped["group"]) == {MAE, LL}  # the lone run is no group of seeds
    row = grouped.set_index("group").loc[LL]
    assert row["runs"] == 3 and row["seeds"] == "0, 1, 2" and row["method"] == "layerlock"
    assert " ± " in row["final_loss"] and row["final_loss"].endswith("(3)")
    runs_table = frame_with(at, "run_id", "group", "seed")
    assert set(runs_table.loc[runs_table["group"] == MAE, "run_id"]) == set(env.runs[MAE])


def test_compare_page_baseline_moves_the_savings(env: GroupStore) -> None:
    at = open_page("compare")
    assert_clean(at)
    assert set(at.multiselect(key="cmp_groups").value) == {MAE, LL}  # recent groups of 2+ seeds
    assert at.multiselect(key="cmp_runs").value == []
    at.multiselect(key="cmp_groups").set_value([LL, MAE]).run()
    assert_clean(at)
    assert at.selectbox(key="cmp_baseline").value == MAE  # by default the first MAE group

    by_run = savings(at)
    mae_runs = [s for label, s in by_run.items() if label.startswith("mae-seed")]
    ll_runs = [s for label, s in by_run.items() if label.startswith("layerlock-seed")]
    assert len(mae_runs) == len(ll_runs) == 3
    assert all(s == pytest.approx(0.0) for s in mae_runs) and all(0 < s < 1 for s in ll_runs)
    ratio = 1 - ll_runs[0]  # LayerLock FLOPs / MAE FLOPs (seeds do not change counted FLOPs)

    at.selectbox(key="cmp_baseline").set_value(LL).run()
    assert_clean(at)
    by_run = savings(at)
    assert all(s == pytest.approx(0.0) for label, s in by_run.items() if label.startswith("layerlock-seed"))
    moved = [s for label, s in by_run.items() if label.startswith("mae-seed")]
    assert moved == [pytest.approx(1 - 1 / ratio)] * 3 and moved[0] < 0

    groups_table = frame_with(at, "group", "final_loss", "flop_saving")
    assert all(cell.endswith("(3)") for cell in groups_table["final_loss"])
    paired = frame_with(at, "group", "metric", "difference", "95% t interval", "pairs", "verdict")
    loss = paired[paired["metric"] == "final_loss"].iloc[0]
    assert loss["pairs"] == 3 and loss["verdict"] in {"higher", "lower", "no difference"}
    assert MAE in loss["group"]


def test_compare_page_draws_a_band_per_group(env: GroupStore) -> None:
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.session_state["selected_groups"] = [MAE]
    at.session_state["selected_runs"] = [env.lone]
    at.run()
    at = open_page("compare", at)
    assert_clean(at)
    assert at.multiselect(key="cmp_groups").value == [MAE] and at.multiselect(key="cmp_runs").value == [env.lone]
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = [t.get("name") for t in spec["data"]]
    fills = [t for t in spec["data"] if t.get("fill") == "toself"]
    assert len(fills) == 1 and fills[0]["name"].endswith("(min..max)")  # the lone run has no band
    assert sum(1 for t in spec["data"] if t.get("showlegend") is False) == 3  # faint seeds
    assert any(n and n.endswith("(mean)") for n in names)
    at.radio(key="cmp_band").set_value("sd").run()
    assert_clean(at)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [t["name"] for t in spec["data"] if t.get("fill") == "toself"][0].endswith("(sd)")
    assert any("mean ± sd" in c.value for c in at.caption)


def test_runs_page_shows_a_study_report(env: GroupStore) -> None:
    at = open_page("runs")
    assert_clean(at)
    assert at.selectbox(key="runs_study").value is not None
    assert any("S1 Depth order" in m.value for m in at.markdown)
    runs_table = frame_with(at, "run_id", "group", "seed")
    assert "study-x" not in set(runs_table.get("name", []))  # the study is not a training run
