"""Run comparison and the freeze-test grid, on in-memory frames (no MLflow)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.compare import (
    collapse_indicators,
    comparison_frame,
    final_value,
    freeze_grid_from_frames,
    summarize_run,
)
from analysis.flops import schedule_flops
from analysis.testing import (
    synthetic_flop_model,
    synthetic_history,
    synthetic_layer_metrics,
)

TOTAL, LOG = 600, 10
MODEL = synthetic_flop_model(4)
SCHEDULE = {"n_blocks": 4, "stages": [{"step": 100, "frozen": 1}, {"step": 300, "frozen": 3}]}


def hist(run_id: str, pairs: dict[str, list[tuple[int, float]]]) -> pd.DataFrame:
    rows = [(run_id, s, m, v) for m, sv in pairs.items() for s, v in sv]
    return pd.DataFrame(rows, columns=["run_id", "step", "metric", "value"])


def test_final_value_is_mean_of_last_three() -> None:
    h = hist("a", {"train/loss": [(0, 5.0), (10, 4.0), (20, 3.0), (30, 2.0), (40, 1.0)]})
    assert final_value(h) == pytest.approx(2.0)
    assert final_value(h, last=1) == 1.0
    assert np.isnan(final_value(h, "train/loss_pixel"))


def test_summary_savings_mae_vs_layerlock() -> None:
    mae_h = synthetic_history(TOTAL, LOG, MODEL, None, seed=1, run_id="mae")
    ll_h = synthetic_history(TOTAL, LOG, MODEL, SCHEDULE, seed=2, run_id="ll")
    rows = [
        summarize_run({"run_id": "ll", "method": "layerlock", "steps": TOTAL}, ll_h, evals={"eval/digit/acc": 0.9}),
        summarize_run({"run_id": "mae", "method": "mae", "steps": TOTAL}, mae_h, evals={"eval/digit/acc": 0.8}),
    ]
    frame = comparison_frame(rows).set_index("run_id")
    # Cumulative FLOPs are logged through the last log step, 590: steps 0..590 = 591 steps.
    logged_steps = TOTAL - LOG + 1
    expected = 1 - schedule_flops(SCHEDULE, MODEL, logged_steps) / (logged_steps * MODEL["per_step"]["0"])
    assert frame.loc["ll", "flop_saving"] == pytest.approx(expected)
    assert frame.loc["ll", "wall_saving"] == pytest.approx(expected)  # synthetic wall time is proportional
    assert frame.loc["mae", "flop_saving"] == 0.0
    assert frame.loc["ll", "final_loss"] == pytest.approx(final_value(ll_h))
    assert frame.loc["ll", "eval/digit/acc"] == 0.9
    # Without an MAE run there is no reference.
    assert comparison_frame(rows[:1])["flop_saving"].isna().all()
    assert list(comparison_frame([]).columns[:3]) == ["run_id", "name", "method"]


def test_collapse_indicators_at_last_probe() -> None:
    healthy = collapse_indicators(synthetic_layer_metrics([100, 200], total_steps=400))
    collapsed = collapse_indicators(synthetic_layer_metrics([100, 200], total_steps=400, collapse=True))
    assert healthy["eff_rank_mean"] > 10 and collapsed["eff_rank_mean"] < 2
    assert collapsed["eff_rank_min"] <= collapsed["eff_rank_mean"]
    assert collapsed["feat_std_mean"] < 0.1 < healthy["feat_std_mean"]


def test_freeze_grid_ratio_and_verdict() -> None:
    children = pd.DataFrame(
        {
            "freeze_step": pd.array([100, 100, 200, 200, 200, None], dtype="Int64"),
            "freeze_blocks": pd.array([1, 2, 1, 2, 3, 1], dtype="Int64"),
            "final_loss": [1.01, 1.10, 1.00, 1.015, np.nan, 9.0],
        }
    )
    grid = freeze_grid_from_frames(children, baseline_final_loss=1.0, tol=0.02)
    assert grid.ratio.loc[1, 100] == pytest.approx(1.01)
    assert grid.ratio.loc[2, 100] == pytest.approx(1.10)
    assert bool(grid.converged.loc[1, 100]) and not bool(grid.converged.loc[2, 100])
    assert bool(grid.converged.loc[2, 200])
    assert bool(grid.converged.loc[3, 200]) is False  # tested without a loss: not converged (bool(NA) raises)
    assert pd.isna(grid.converged.loc[3, 100])  # untested
    assert grid.max_converged_prefix().to_dict() == {100: 1, 200: 2}
    record = grid.to_dict()
    assert {"blocks": 2, "step": 100, "ratio": pytest.approx(1.1), "converged": False} in record["cells"]
    assert len(record["cells"]) == 5
