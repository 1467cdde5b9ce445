"""Convergence rules on synthetic runs with known per-block convergence steps (no MLflow)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.convergence import (
    convergence_report,
    gradnorm_convergence,
    online_convergence,
    order_statistics,
    posthoc_convergence,
)
from analysis.testing import synthetic_layer_metrics
from core.errors import LayerLockError

PROBE, LOG, TOTAL = 50, 10, 600
# Depth-ordered truth; steps off the probe grid on purpose; the last block never converges.
TRUTH = [120, 180, 260, 330, 410, 470, None]
SEEDS = [0, 1, 2, 3]


def frame(**kw) -> pd.DataFrame:
    return synthetic_layer_metrics(TRUTH, total_steps=TOTAL, probe_every=PROBE, log_every=LOG, **kw)


def tiny(metric: str, values: list[float], step: int = PROBE, block: int = 0) -> pd.DataFrame:
    """One block's metric at probe steps 0, step, 2*step, ..."""
    return pd.DataFrame(
        {
            "run_id": "r",
            "step": [i * step for i in range(len(values))],
            "block": block,
            "metric": metric,
            "value": values,
        }
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_posthoc_within_one_probe_of_truth(seed: int) -> None:
    conv = posthoc_convergence(frame(seed=seed), threshold=0.95)
    assert list(conv.index) == list(range(len(TRUTH)))
    for block, truth in enumerate(TRUTH):
        if truth is None:
            assert pd.isna(conv[block])
        else:
            # First probe at or after the truth: never early, at most one interval late.
            assert 0 <= conv[block] - truth < PROBE, (block, conv[block], truth)


def test_posthoc_needs_the_suffix_to_stay_above() -> None:
    # A spike above 0.95 at step 50 then a dip: convergence is the start of the final run.
    conv = posthoc_convergence(tiny("cka_final", [0.5, 0.97, 0.8, 0.96, 0.97, 1.0]))
    assert conv[0] == 150


def test_posthoc_last_probe_alone_is_not_convergence() -> None:
    # cka_final is 1.0 at the last probe by construction; that alone proves nothing.
    assert pd.isna(posthoc_convergence(tiny("cka_final", [0.5, 0.6, 0.7, 1.0]))[0])
    assert pd.isna(posthoc_convergence(tiny("cka_final", [1.0]))[0])
    # Reaching the threshold (>=) one probe before the end does count.
    assert posthoc_convergence(tiny("cka_final", [0.5, 0.95, 1.0]))[0] == 50


def test_posthoc_nan_counts_as_below() -> None:
    assert posthoc_convergence(tiny("cka_final", [0.96, float("nan"), 0.97, 1.0]))[0] == 100


@pytest.mark.parametrize("seed", SEEDS)
def test_online_start_and_end(seed: int) -> None:
    df = frame(seed=seed)
    patience = 3
    start = online_convergence(df, threshold=0.99, patience=patience, report="start")
    end = online_convergence(df, threshold=0.99, patience=patience, report="end")
    for block, truth in enumerate(TRUTH):
        if truth is None:
            assert pd.isna(start[block]) and pd.isna(end[block])
            continue
        if pd.isna(end[block]):
            # Too close to the end for `patience` more probes; never for early blocks.
            assert truth + (patience + 1) * PROBE > TOTAL
            continue
        assert 0 <= start[block] - truth < PROBE
        assert end[block] == start[block] + patience * PROBE


def test_online_isolated_spike_and_step_zero_do_not_count() -> None:
    # Step 0 is 1.0 (no predecessor) and one spike at 100: neither makes a streak of 2.
    values = [1.0, 0.9, 0.996, 0.9, 0.995, 0.995, 0.992]
    conv = online_convergence(tiny("cka_prev", values), threshold=0.99, patience=2)
    assert conv[0] == 250
    assert online_convergence(tiny("cka_prev", values), threshold=0.99, patience=2, report="start")[0] == 150
    assert pd.isna(online_convergence(tiny("cka_prev", [1.0, 0.995, 0.9]), 0.99, 2)[0])


@pytest.mark.parametrize("seed", SEEDS)
def test_gradnorm_detects_after_truth_within_lag(seed: int) -> None:
    window, patience = 5, 3
    conv = gradnorm_convergence(frame(seed=seed), eps=0.05, window=window, patience=patience)
    for block, truth in enumerate(TRUTH):
        if truth is None:
            assert pd.isna(conv[block])
        else:
            # Causal rule: never before the truth, lagging by at most two windows + patience.
            assert truth <= conv[block] <= truth + (2 * window + patience) * LOG, (block, conv[block], truth)


def test_order_statistics() -> None:
    assert order_statistics(pd.Series([100, 200, 300])) == {"spearman_rho": 1.0, "kendall_tau": 1.0}
    stats = order_statistics(pd.Series([300, 200, 100]))
    assert stats["spearman_rho"] == pytest.approx(-1.0) and stats["kendall_tau"] == pytest.approx(-1.0)
    # Never-converged ranks after the end: values rank [1, 3, 2] against depth [1, 2, 3],
    # so d = [0, -1, 1], rho = 1 - 6 * 2 / (3 * 8) = 0.5.
    stats = order_statistics(pd.Series(pd.array([100, None, 200], dtype="Int64")))
    assert stats["spearman_rho"] == pytest.approx(0.5)
    none = {"spearman_rho": None, "kendall_tau": None}
    assert order_statistics(pd.Series(pd.array([100, None, None], dtype="Int64"))) == none
    assert order_statistics(pd.Series([100, 100])) == none


def test_report_is_json_with_documented_keys() -> None:
    report = convergence_report(frame(seed=0), method="posthoc", threshold=0.95)
    parsed = json.loads(json.dumps(report))  # no NaN, no numpy scalars
    for key in ("run_id", "method", "threshold", "blocks", "spearman_rho", "kendall_tau"):
        assert key in parsed
    assert parsed["run_id"] == "synthetic" and parsed["method"] == "posthoc"
    assert parsed["blocks"][-1] == {"block": len(TRUTH) - 1, "converged_step": None}
    assert parsed["spearman_rho"] == pytest.approx(1.0)
    for method in ("online", "gradnorm"):
        json.dumps(convergence_report(frame(seed=0), method=method))


def test_missing_metric_and_bad_input_raise_clear_errors() -> None:
    df = frame(seed=0)
    without = df[df["metric"] != "cka_final"]
    with pytest.raises(LayerLockError, match=r"run synthetic has no 'cka_final'"):
        posthoc_convergence(without)
    with pytest.raises(LayerLockError, match="cka_prev"):
        convergence_report(df[df["metric"] != "cka_prev"], method="online")
    with pytest.raises(LayerLockError, match="unknown convergence method"):
        convergence_report(df, method="magic")  # type: ignore[arg-type]
    two_runs = pd.concat([df, df.assign(run_id="other")])
    with pytest.raises(LayerLockError, match="2 runs"):
        posthoc_convergence(two_runs)
