"""``analysis compare GROUP GROUP``: groups of seeds from a throwaway store of synthetic runs.

Each run logs a constant ``train/loss`` and linear cumulative ``train/flops``, so every number
the comparison prints is known by hand: group MAE (seeds 0, 1, 2) has final losses 1.0, 1.1,
0.9 and 100 FLOP per step; group LL has 0.8, 0.92, 0.68 and 80 FLOP per step (a 20% saving),
plus one RUNNING run that must be left out; a lone run carries no group tag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis import io
from analysis.__main__ import main
from analysis.compare import COMPARE_PARTS, compare_groups, group_comparison
from analysis.testing import create_run_from_frames
from core.errors import LayerLockError, RunNotFoundError

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
STEPS = 20
MAE, LL = "pixel-moving_digits-0000aaaa", "layerlock-moving_digits-0000bbbb"
LOSS = {MAE: [1.0, 1.1, 0.9], LL: [0.8, 0.92, 0.68]}
FLOPS_PER_STEP = {MAE: 100.0, LL: 80.0}


def history(loss: float, flops_per_step: float) -> pd.DataFrame:
    steps = np.arange(0, STEPS + 1, 2)
    return pd.concat(
        [
            pd.DataFrame({"step": steps, "metric": "train/loss", "value": loss}),
            pd.DataFrame({"step": steps, "metric": "train/flops", "value": flops_per_step * (steps + 1)}),
            pd.DataFrame({"step": steps, "metric": "train/wall_s", "value": 0.01 * flops_per_step * (steps + 1)}),
        ],
        ignore_index=True,
    )


@dataclass(frozen=True)
class Store:
    uri: str
    runs: dict[str, list[str]]
    running: str
    lone: str


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    tmp = tmp_path_factory.mktemp("groups")
    uri = f"sqlite:///{tmp}/mlflow.db"
    common = {"uri": uri, "artifact_root": (tmp / "artifacts").as_uri()}
    runs: dict[str, list[str]] = {}
    for group, losses in LOSS.items():
        method = group.split("-")[0].replace("pixel", "mae")
        for seed, loss in enumerate(losses):
            runs.setdefault(group, []).append(
                create_run_from_frames(
                    "layerlock",
                    history=history(loss, FLOPS_PER_STEP[group]),
                    run_name=f"{method}-seed{seed}",
                    params={"train.seed": seed, "train.steps": STEPS},
                    tags={io.TAG_METHOD: method, io.TAG_GROUP: group},
                    **common,
                )
            )
    running = create_run_from_frames(
        "layerlock",
        history=history(5.0, 80.0).head(4),
        params={"train.seed": 3},
        status="RUNNING",
        tags={io.TAG_METHOD: "layerlock", io.TAG_GROUP: LL},
        **common,
    )
    lone = create_run_from_frames(
        "layerlock",
        history=history(0.95, 90.0),
        params={"train.seed": 0},
        tags={io.TAG_METHOD: "mae"},
        run_name="lone",
        **common,
    )
    return Store(uri, runs, running, lone)


def test_runs_in_group_and_list_columns(store: Store) -> None:
    members = io.runs_in_group(LL, store.uri)
    assert list(members["run_id"]) == [*store.runs[LL], store.running]  # by seed
    assert list(members["seed"]) == [0, 1, 2, 3] and set(members["group"]) == {LL}
    assert io.runs_in_group("no-such-group", store.uri).empty
    listed = io.list_runs(store.uri).set_index("run_id")
    assert pd.isna(listed.loc[store.lone, "group"]) and listed.loc[store.runs[MAE][1], "seed"] == 1


def _compare(names: list[str], uri: str, baseline: str | None = None):
    """What ``python -m analysis compare`` does: resolve the names, read the runs, compare."""
    specs = io.resolve_groups(names, uri)
    runs = io.load_runs([r for spec in specs for r in spec.run_ids], uri, COMPARE_PARTS)
    return compare_groups(specs, runs, baseline=baseline)


def test_compare_groups_summary_savings_and_paired(store: Store) -> None:
    result = _compare([MAE, LL, store.lone], store.uri)
    assert result.baseline == MAE and result.groups == [MAE, LL, store.lone]
    assert [s.kind for s in result.specs] == ["group", "group", "run"]
    assert result.specs[1].skipped == (store.running,) and store.running not in set(result.runs["run_id"])
    summary = result.summary.set_index(["group", "metric"])
    assert summary.loc[(MAE, "final_loss"), "mean"] == pytest.approx(1.0)
    assert summary.loc[(MAE, "final_loss"), "sd"] == pytest.approx(0.1)
    assert summary.loc[(LL, "final_loss"), "n"] == 3
    assert summary.loc[(LL, "flop_saving"), "mean"] == pytest.approx(0.2)  # against the MAE group's mean
    assert summary.loc[(MAE, "flop_saving"), "mean"] == pytest.approx(0.0)
    assert summary.loc[(store.lone, "final_loss"), "n"] == 1 and np.isnan(summary.loc[(store.lone, "final_loss"), "sd"])

    paired = result.paired.set_index(["group_b", "metric"])
    loss = paired.loc[(LL, "final_loss")]
    diffs = np.array([-0.2, -0.18, -0.22])
    half = sps.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert loss["mean_diff"] == pytest.approx(-0.2) and loss["n"] == 3
    assert (loss["ci_low"], loss["ci_high"]) == (pytest.approx(-0.2 - half), pytest.approx(-0.2 + half))
    assert loss["verdict"] == "lower"
    lone = paired.loc[(store.lone, "final_loss")]
    assert lone["n"] == 1 and lone["verdict"] == "n/a (one seed)"

    # Another baseline moves the savings with it.
    again = _compare([MAE, LL], store.uri, baseline=LL).summary.set_index(["group", "metric"])
    assert again.loc[(MAE, "flop_saving"), "mean"] == pytest.approx(1 - 100 / 80)
    with pytest.raises(LayerLockError, match="--baseline nope"):
        _compare([MAE, LL], store.uri, baseline="nope")
    with pytest.raises(RunNotFoundError, match="not a run id or a layerlock.group name: nope"):
        io.resolve_groups([MAE, "nope"], store.uri)


def test_group_comparison_is_pure() -> None:
    rows = [
        {
            "run_id": f"r{g}{s}",
            "group": g,
            "seed": s,
            "method": "mae",
            "final_loss": v,
            "total_flops": 10.0,
            "wall_s": 1.0,
        }
        for g, vals in (("a", [1.0, 2.0]), ("b", [1.5, 2.5]))
        for s, v in enumerate(vals)
    ]
    result = group_comparison(rows)
    out = result.paired.set_index("metric").loc["final_loss"]
    assert out["mean_diff"] == pytest.approx(0.5) and out["sd"] == 0.0 and out["verdict"] == "higher"
    assert list(result.runs.columns[:3]) == ["run_id", "group", "seed"]
    with pytest.raises(LayerLockError, match="nothing to compare"):
        group_comparison([])


def test_cli_compare_groups_json_and_text(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", MAE, LL, "--json", "--tracking-uri", store.uri]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert set(out) >= {"groups", "paired", "runs", "baseline"} and out["baseline"] == MAE
    assert "t interval" in out["interval"] and store.running in captured.err
    groups = {g["group"]: g for g in out["groups"]}
    assert groups[LL]["n_runs"] == 3 and groups[LL]["seeds"] == [0, 1, 2] and groups[LL]["method"] == "layerlock"
    assert groups[MAE]["metrics"]["final_loss"]["mean"] == pytest.approx(1.0)
    assert groups[MAE]["metrics"]["final_loss"]["n"] == 3
    assert groups[LL]["metrics"]["flop_saving"]["mean"] == pytest.approx(0.2)
    loss = next(p for p in out["paired"] if p["metric"] == "final_loss")
    assert loss["group_a"] == MAE and loss["group_b"] == LL and loss["verdict"] == "lower"
    assert {r["run_id"] for r in out["runs"]} == set(store.runs[MAE] + store.runs[LL])

    assert main(["compare", MAE, LL, "--baseline", LL, "--tracking-uri", store.uri]) == 0
    text = capsys.readouterr().out
    assert f"baseline: {LL}" in text and "1 ± 0.1 (3)" in text and "95% t interval" in text and "higher" in text

    assert main(["compare", MAE, "0" * 32, "--tracking-uri", store.uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: not a run id or a layerlock.group name") and err.count("\n") == 1
