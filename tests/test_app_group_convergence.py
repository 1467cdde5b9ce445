"""Convergence over a group of seeds: the pure aggregation in ``analysis.convergence`` (checked
against numpy/scipy on synthetic groups), its loader in ``analysis.io``, and the Convergence
page's group view (AppTest): the heatmap of the mean with the spread on hover, mean curves in a
band, each block's convergence step with its 95% interval, rho over seeds, and one run alone.

The store holds synthetic runs only: a group of three seeds whose blocks converge at steps
that move with the seed (the third seed probes half as often: another step grid), a group of
two seeds, a failed run of the first group (left out) and a lone run.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import LayerLockError, io
from analysis.convergence import (
    detect_convergence,
    group_convergence,
    group_order,
    group_steps,
    mean_over_runs,
    metric_wide,
    order_statistics,
)
from analysis.testing import create_run_from_frames, synthetic_history, synthetic_layer_metrics
from tests.helpers import HOME, TIMEOUT, assert_clean, frame_with, open_page, point_app_at

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
GROUP, PAIR = "pixel-moving_digits-0000c0c0", "layerlock-moving_digits-0000d0d0"
STEPS = 48
# seed -> (convergence step per block, probe every): seed 2 probes on a coarser grid.
SEEDS = {0: ([8, 16, 28, None], 4), 1: ([8, 20, 32, None], 4), 2: ([16, 24, 32, 40], 8)}


def t_half(values: np.ndarray) -> float:
    return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


# ----------------------------------------------------------------------------- pure aggregation


def test_mean_over_runs_aligns_on_common_steps_and_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    grids = {"a": np.arange(0, 41, 4), "b": np.arange(0, 41, 8), "c": np.arange(0, 45, 4)}
    wides = {
        k: pd.DataFrame(rng.normal(size=(len(s), 3)), index=pd.Index(s, name="step"), columns=[0, 1, 2])
        for k, s in grids.items()
    }
    wides["c"][3] = 1.0  # a block only one run has: left out
    wides["a"].loc[16, 1] = np.nan  # a missing value: that cell counts the other two runs
    out = mean_over_runs(wides)
    common = np.arange(0, 41, 8)
    assert out["mean"].index.tolist() == common.tolist() and out["mean"].columns.tolist() == [0, 1, 2]
    cube = np.stack([w.loc[common, [0, 1, 2]].to_numpy() for w in wides.values()])
    np.testing.assert_allclose(out["mean"].to_numpy(), np.nanmean(cube, axis=0))
    np.testing.assert_allclose(out["sd"].to_numpy(), np.nanstd(cube, axis=0, ddof=1))
    np.testing.assert_allclose(out["lo"].to_numpy(), np.nanmin(cube, axis=0))
    np.testing.assert_allclose(out["hi"].to_numpy(), np.nanmax(cube, axis=0))
    assert out["n"].loc[16, 1] == 2 and out["n"].to_numpy().sum() == 3 * cube[0].size - 1
    assert out["logged"].to_dict() == {"a": 11, "b": 6, "c": 12}
    with pytest.raises(LayerLockError, match="share no logged step"):
        mean_over_runs({"a": wides["a"].loc[[4]], "b": wides["b"].loc[[8]]})
    with pytest.raises(LayerLockError, match="no run"):
        mean_over_runs({"a": pd.DataFrame()})


def test_group_steps_mean_and_t_interval_match_numpy() -> None:
    steps = {"s0": [100, 200, 300, None], "s1": [120, 260, 330, None], "s2": [90, 230, None, 800]}
    convs = {k: pd.Series(pd.array(v, dtype="Int64"), index=pd.Index(range(4), name="block")) for k, v in steps.items()}
    table = group_steps(convs).set_index("block")
    assert table["n_runs"].tolist() == [3] * 4 and table["n"].tolist() == [3, 3, 2, 1]
    for block in (0, 1, 2):
        values = np.array([v[block] for v in steps.values() if v[block] is not None], dtype=float)
        row = table.loc[block]
        assert row["mean"] == pytest.approx(values.mean()) and row["sd"] == pytest.approx(values.std(ddof=1))
        assert row["ci_low"] == pytest.approx(values.mean() - t_half(values))
        assert row["ci_high"] == pytest.approx(values.mean() + t_half(values))
    assert table.loc[3, "mean"] == 800 and pd.isna(table.loc[3, "ci_low"])  # one run: no interval
    assert table.loc[2, "s2"] is pd.NA and table.loc[1, "s1"] == 260  # each run's own step kept


def test_group_order_is_the_s1_estimate_of_per_run_rhos() -> None:
    rng = np.random.default_rng(3)
    convs = {
        f"s{i}": pd.Series(pd.array(rng.permutation(8) * 10 + np.arange(8) * 15, dtype="Int64"), index=range(8))
        for i in range(4)
    }
    convs["flat"] = pd.Series(pd.array([5, None, None, None, None, None, None, None], dtype="Int64"), index=range(8))
    order = group_order(convs)
    rhos = np.array([stats.spearmanr(np.arange(8), c.astype(float)).statistic for k, c in convs.items() if k != "flat"])
    rho = order["spearman_rho"]
    assert order["undefined_runs"] == 1 and rho["n"] == 4  # one converged block: rho undefined, left out
    assert rho["mean"] == pytest.approx(rhos.mean())
    assert (rho["ci_low"], rho["ci_high"]) == pytest.approx((rhos.mean() - t_half(rhos), rhos.mean() + t_half(rhos)))
    assert rho["verdict"] == ("held" if rho["ci_low"] > 0 else "inconclusive" if rho["ci_high"] > 0 else "not held")
    taus = [order_statistics(c)["kendall_tau"] for k, c in convs.items() if k != "flat"]
    assert order["kendall_tau"]["mean"] == pytest.approx(np.mean(taus))


def test_group_convergence_detects_each_run_on_its_own_grid() -> None:
    frames = {
        s: synthetic_layer_metrics(conv, total_steps=STEPS, probe_every=every, log_every=4, seed=s, run_id=f"r{s}")
        for s, (conv, every) in SEEDS.items()
    }
    out = group_convergence(frames)
    assert out["metric"] == "cka_final" and out["runs"] == [0, 1, 2]
    for s, frame in frames.items():
        own = detect_convergence(frame, "posthoc")
        assert out["convs"][s].equals(own)
        assert out["steps"][s].tolist() == own.tolist()
    assert out["wide"]["mean"].index.tolist() == list(range(0, STEPS + 1, 8))  # seed 2's coarser grid
    cube = np.stack([metric_wide(f, "cka_final").loc[range(0, STEPS + 1, 8)].to_numpy() for f in frames.values()])
    np.testing.assert_allclose(out["wide"]["mean"].to_numpy(), cube.mean(axis=0))
    rhos = [order_statistics(c)["spearman_rho"] for c in out["convs"].values()]
    assert out["order"]["spearman_rho"]["mean"] == pytest.approx(np.mean(rhos))


# ----------------------------------------------------------------------------- store and page


@dataclass(frozen=True)
class SeedStore:
    uri: str
    group: list[str]  # seed order
    pair: list[str]
    failed: str
    lone: str


def build_seed_store(folder: Path) -> SeedStore:
    uri = f"sqlite:///{folder}/mlflow.db"
    common = {"uri": uri, "artifact_root": (folder / "artifacts").as_uri()}

    def run(name: str, group: str | None, seed: int, conv, every: int, status: str = "FINISHED", start: int = 0):
        tags = {io.TAG_METHOD: "mae", io.TAG_DATASET: "moving_digits"} | ({io.TAG_GROUP: group} if group else {})
        return create_run_from_frames(
            "layerlock",
            history=synthetic_history(STEPS, 4, seed=seed),
            layer_df=synthetic_layer_metrics(conv, total_steps=STEPS, probe_every=every, log_every=4, seed=seed),
            run_name=name,
            params={"train.seed": seed, "train.steps": STEPS, "model.depth": 4},
            tags=tags,
            status=status,
            start_time=1_700_000_000_000 + start,
            **common,
        )

    pair = [run(f"ll-seed{s}", PAIR, s, [12, 24, 36, None], 4, start=10 + s) for s in (0, 1)]
    group = [run(f"mae-seed{s}", GROUP, s, conv, every, start=20 + s) for s, (conv, every) in SEEDS.items()]
    failed = run("mae-seed3", GROUP, 3, [4, 8, 12, 16], 4, status="FAILED", start=30)
    lone = run("lone", None, 0, [8, 16, 24, 32], 4, start=40)  # newest: the single-run page's default
    return SeedStore(uri, group, pair, failed, lone)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SeedStore:
    return build_seed_store(tmp_path_factory.mktemp("seed-store"))


@pytest.fixture
def env(store: SeedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SeedStore:
    point_app_at(store.uri, tmp_path, monkeypatch)
    return store


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def array(value) -> np.ndarray:
    """A figure's array as plotly serialised it: a list, or a typed base64 block (plotly 6)."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = [int(n) for n in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape).astype(float)
    return np.array(value, dtype=float)


def test_io_loads_the_finished_runs_of_a_group(store: SeedStore) -> None:
    frames = io.load_group_layer_metrics(GROUP, store.uri, metrics=["cka_final"])
    assert list(frames) == store.group  # by seed; the failed run is left out
    assert all(set(f["metric"]) == {"cka_final"} and set(f["run_id"]) == {r} for r, f in frames.items())
    assert list(io.load_group_layer_metrics(store.lone, store.uri)) == [store.lone]  # a run id: itself


def test_convergence_page_shows_a_group_of_seeds(env: SeedStore) -> None:
    at = open_page("convergence")
    assert_clean(at)
    assert at.selectbox(key="conv_group").value == "" and at.selectbox(key="conv_run").value == env.lone
    assert set(at.selectbox(key="conv_group").options) >= {f"{GROUP} · 3 runs", f"{PAIR} · 2 runs"}

    at.selectbox(key="conv_group").set_value(GROUP).run()
    assert_clean(at)
    assert at.selectbox(key="conv_member").value == "__all__"
    expected = group_convergence(io.load_group_layer_metrics(GROUP, env.uri, metrics=["cka_final"]))
    heatmap, curves, order = charts(at)
    # The heatmap: the mean over seeds on the common (coarser) grid, sd and min..max on hover.
    z = array(heatmap["data"][0]["z"])
    np.testing.assert_allclose(z, expected["wide"]["mean"].T.to_numpy())
    assert array(heatmap["data"][0]["x"]).tolist() == list(range(0, STEPS + 1, 8))
    spread = array(heatmap["data"][0]["customdata"])
    np.testing.assert_allclose(spread[..., 0], expected["wide"]["sd"].T.to_numpy(), atol=1e-5)
    np.testing.assert_allclose(spread[..., 2], expected["wide"]["hi"].T.to_numpy(), atol=1e-5)
    assert "min..max" in heatmap["data"][0]["hovertemplate"]
    # Curves: a band and a mean line per block, starred mean steps with their interval.
    assert sum(t.get("fill") == "toself" for t in curves["data"]) == 4
    stars = [t for t in curves["data"] if t.get("marker", {}).get("symbol") == "star"]
    assert len(stars) == 4 and any(t["error_x"]["visible"] for t in stars)
    # Convergence step by depth: the mean with its 95% interval, and each seed's own step.
    bars = order["data"][0]
    table = frame_with(at, "block", "mean step", "ci low", "ci high", "converged in")
    steps = expected["steps"]
    np.testing.assert_allclose(array(bars["y"])[:3], steps["mean"][:3])
    np.testing.assert_allclose(table["ci low"][:3], steps["ci_low"][:3].astype(float).round(1))
    assert table["converged in"].tolist() == ["3 / 3", "3 / 3", "3 / 3", "1 / 3"]
    assert [t["name"] for t in order["data"][1:]] == ["seed 0", "seed 1", "seed 2"]
    # rho over seeds with its interval, as the study's S1 reads it.
    rho = expected["order"]["spearman_rho"]
    assert any(f"{rho['mean']:+.2f}" == m.value for m in at.metric)
    assert any("95% t interval" in c.value and f"N={rho['n']}" in c.value for c in at.caption)
    assert any("step grids differ" in c.value for c in at.caption)

    at.radio(key="conv_band").set_value("sd").run()
    assert_clean(at)
    assert any(t.get("name", "").endswith("(sd)") for t in charts(at)[1]["data"])

    # One run of the group alone: the single-run page of that run.
    at.selectbox(key="conv_member").set_value(env.group[1]).run()
    assert_clean(at)
    assert not any(t.get("fill") == "toself" for t in charts(at)[1]["data"])
    single = detect_convergence(io.load_layer_metrics(env.group[1], env.uri), "posthoc")
    shown = frame_with(at, "block", "converged at step")["converged at step"]
    assert [None if pd.isna(s) else int(s) for s in shown] == [None if pd.isna(s) else int(s) for s in single]
    assert single.notna().sum() == 3  # seed 1's deepest block never converged


def test_convergence_page_opens_on_a_group_from_the_url(env: SeedStore) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.query_params["group"] = PAIR
    at.run()
    at = open_page("convergence", at)
    assert_clean(at)
    assert at.selectbox(key="conv_group").value == PAIR
    assert any("rho > 0: held" in c.value for c in at.caption)  # both seeds converge in depth order
    assert len(charts(at)) == 3


@pytest.mark.system  # AppTest renders of both pages, several times over
def test_bench_times_the_group_page_beside_the_single_run_page() -> None:
    from tests.helpers import run_cli

    done = run_cli("-m", "app.bench", "--blocks", "3", "--steps", "40", "--repeats", "1", "--json", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{") :])
    group = result["group"]
    assert group["runs"] == 3 and len(group["cold_all_s"]) == 1
    assert all(group[k] > 0 for k in ("cold_s", "warm_same_session_s", "warm_new_session_s"))
    assert set(group["cold_breakdown"]) == {"read_store_s", "mean_over_runs_s", "detect_and_intervals_s", "figures_s"}
    assert isinstance(result["meets_targets"], bool) and result["cold_s"] > 0
