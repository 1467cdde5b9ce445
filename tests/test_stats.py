"""analysis.stats on synthetic runs with known values, checked against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis.claims import claim, claim_verdict, difference, estimate, format_estimate, freeze_cost
from analysis.stats import (
    NO_DIFFERENCE,
    NO_PAIRS,
    ONE_SEED,
    format_mean_sd,
    group_summary,
    paired_against,
    paired_differences,
    summary_table,
)
from core.errors import LayerLockError

# Three seeds per group. B is A minus 0.2 give or take 0.02 (a clear, paired gain);
# C wobbles around A by more than its mean shift (a difference inside the noise).
VALUES = {
    "A": [1.00, 1.10, 0.90],
    "B": [0.80, 0.92, 0.68],
    "C": [1.05, 1.00, 0.95],
}


def runs() -> pd.DataFrame:
    rows = [
        {"run_id": f"{g}{s}", "group": g, "seed": s, "final_loss": v, "wall_s": 10.0 + s}
        for g, values in VALUES.items()
        for s, v in enumerate(values)
    ]
    rows.append({"run_id": "single", "group": "S", "seed": 0, "final_loss": 0.5, "wall_s": 3.0})
    return pd.DataFrame(rows)


def hand_interval(diffs: list[float]) -> tuple[float, float, float, float]:
    d = np.asarray(diffs)
    mean, sd = d.mean(), d.std(ddof=1)
    half = sps.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    return mean, sd, mean - half, mean + half


def test_group_summary_mean_sd_n() -> None:
    summary = group_summary(runs(), ["final_loss", "wall_s", "not_logged"]).set_index(["group", "metric"])
    assert list(summary.index.get_level_values(0).unique()) == ["A", "B", "C", "S"]
    a = summary.loc[("A", "final_loss")]
    assert a["mean"] == pytest.approx(1.0) and a["sd"] == pytest.approx(0.1) and a["n"] == 3
    assert summary.loc[("B", "final_loss"), "mean"] == pytest.approx(0.8)
    assert summary.loc[("A", "wall_s"), "sd"] == pytest.approx(1.0)
    single = summary.loc[("S", "final_loss")]
    assert single["n"] == 1 and math.isnan(single["sd"])
    assert ("A", "not_logged") not in summary.index

    with_nan = runs()
    with_nan.loc[0, "final_loss"] = np.nan  # a run without the metric is not counted
    a = group_summary(with_nan, ["final_loss"]).set_index("group").loc["A"]
    assert a["n"] == 2 and a["mean"] == pytest.approx(1.0)


def test_paired_difference_t_interval_matches_hand_computation() -> None:
    out = paired_differences(runs(), "final_loss", "A", "B")
    mean, sd, low, high = hand_interval([-0.2, -0.18, -0.22])
    assert out["n"] == 3 and out["pairs"] == [0, 1, 2]
    assert out["mean_diff"] == pytest.approx(mean) == pytest.approx(-0.2)
    assert out["sd"] == pytest.approx(sd) == pytest.approx(0.02)
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert out["ci_high"] < 0 and out["verdict"] == "lower" and "t interval" in out["interval"]
    assert paired_differences(runs(), "final_loss", "B", "A")["verdict"] == "higher"


def test_difference_inside_the_noise_is_no_difference() -> None:
    out = paired_differences(runs(), "final_loss", "A", "C")
    mean, _, low, high = hand_interval([0.05, -0.10, 0.05])
    assert out["mean_diff"] == pytest.approx(mean)
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert out["ci_low"] < 0 < out["ci_high"]
    assert out["verdict"] == NO_DIFFERENCE


def test_pairing_on_common_seeds_and_small_n() -> None:
    frame = runs()
    shifted = frame[frame["group"] == "C"].assign(group="D", seed=lambda f: f["seed"] + 1)  # seeds 1, 2, 3
    frame = pd.concat([frame, shifted], ignore_index=True)
    out = paired_differences(frame, "final_loss", "A", "D")
    assert out["pairs"] == [1, 2] and out["n"] == 2
    assert out["mean_diff"] == pytest.approx(((1.05 - 1.10) + (1.00 - 0.90)) / 2)

    one = paired_differences(frame, "final_loss", "A", "S")
    assert one["n"] == 1 and one["ci_low"] is None and one["ci_high"] is None and one["verdict"] == ONE_SEED
    assert one["mean_diff"] == pytest.approx(-0.5)
    none = paired_differences(
        frame.assign(seed=np.where(frame["group"] == "S", 9, frame["seed"])), "final_loss", "A", "S"
    )
    assert none["n"] == 0 and none["mean_diff"] is None and none["verdict"] == NO_PAIRS

    rerun = pd.concat([runs(), pd.DataFrame([{"group": "B", "seed": 0, "final_loss": 0.84}])], ignore_index=True)
    assert paired_differences(rerun, "final_loss", "A", "B")["mean_diff"] == pytest.approx(
        ((0.82 - 1.0) + (0.92 - 1.10) + (0.68 - 0.90)) / 3
    )  # seed 0 of B: the mean of its two runs


def test_paired_against_baseline_and_text() -> None:
    table = paired_against(runs(), ["final_loss", "wall_s"], "A")
    assert list(zip(table["group_b"], table["metric"], strict=True)) == [
        ("B", "final_loss"),
        ("B", "wall_s"),
        ("C", "final_loss"),
        ("C", "wall_s"),
        ("S", "final_loss"),
        ("S", "wall_s"),
    ]
    assert set(table["group_a"]) == {"A"}
    wall = table[(table["group_b"] == "B") & (table["metric"] == "wall_s")].iloc[0]
    assert wall["mean_diff"] == 0.0 and wall["verdict"] == NO_DIFFERENCE  # identical pairs: a zero-width interval
    with pytest.raises(LayerLockError, match="baseline group 'Z'"):
        paired_against(runs(), ["final_loss"], "Z")
    with pytest.raises(LayerLockError, match="lacks column"):
        paired_differences(runs().drop(columns="seed"), "final_loss", "A", "B")

    assert format_mean_sd(1.0, 0.1, 3) == "1 ± 0.1 (3)"
    assert format_mean_sd(0.5, float("nan"), 1) == "0.5 (1)"
    assert format_mean_sd(float("nan"), float("nan"), 0) == "n/a"
    text = summary_table(group_summary(runs(), ["final_loss"]))
    assert text.loc["A", "final_loss"] == "1 ± 0.1 (3)" and text.loc["S", "final_loss"] == "0.5 (1)"


def test_spread_over_runs_band() -> None:
    from analysis.stats import spread_over_runs

    curves = {
        "r0": pd.DataFrame({"step": [0, 2, 4], "x": [0.0, 20.0, 40.0], "y": [1.0, 0.8, 0.6]}),
        "r1": pd.DataFrame({"step": [0, 2, 4], "x": [0.0, 22.0, 42.0], "y": [1.2, 0.6, 0.5]}),
        "r2": pd.DataFrame({"step": [0, 2], "x": [0.0, 21.0], "y": [1.1, 0.7]}),  # stopped early
    }
    band = spread_over_runs(curves).set_index("step")
    assert list(band.index) == [0, 2, 4] and list(band["n"]) == [3, 3, 2]
    assert band.loc[2, "mean"] == pytest.approx(0.7) and band.loc[2, "x"] == pytest.approx(21.0)
    assert (band.loc[2, "lo"], band.loc[2, "hi"]) == (pytest.approx(0.6), pytest.approx(0.8))
    assert band.loc[0, "sd"] == pytest.approx(0.1)
    assert spread_over_runs({}).empty


# ----------------------------------------------------------------------------- a study's claims


def test_estimate_and_claim_verdicts() -> None:
    est = estimate([0.1, 0.2, 0.3, None, float("nan")])
    assert est["n"] == 3 and est["mean"] == pytest.approx(0.2) and est["sd"] == pytest.approx(0.1)
    half = sps.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert (est["ci_low"], est["ci_high"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert claim_verdict(est, 0.0, "above") == "inconclusive"  # the interval contains 0
    assert claim([0.5, 0.52, 0.49], 0.0, "above")["verdict"] == "held"
    assert claim([0.5, 0.52, 0.49], 0.0, "below")["verdict"] == "not held"
    assert claim([0.5, 0.52, 0.49], 0.6, "below")["verdict"] == "held"
    assert claim([0.5])["verdict"] == "one seed" and claim([])["verdict"] == "n/a"
    assert format_estimate(estimate([0.5])) == "+0.500 (N=1)" and format_estimate(estimate([])) == "n/a"


def test_difference_verdict_is_the_stats_verdict() -> None:
    assert difference([-0.1, 0.1, 0.05])["verdict"] == "no difference"  # interval straddles 0
    assert difference([0.2, 0.21, 0.19])["verdict"] == "higher"
    assert difference([-0.2, -0.21, -0.19])["verdict"] == "lower"
    assert difference([0.2])["verdict"] == "n/a (one seed)"


def test_freeze_cost_against_the_seed_noise() -> None:
    cells = {"index": [2, 4], "columns": [100, 300]}
    seed0 = pd.DataFrame([[1.00, 1.00], [1.10, 1.01]], **cells)
    seed1 = pd.DataFrame([[1.02, 1.00], [1.14, 1.00]], **cells)
    cost = freeze_cost([seed0, seed1], [0.02, 0.03])
    assert cost["mean_ratio"]["4"] == {"100": pytest.approx(1.12), "300": pytest.approx(1.005)}
    assert cost["early_deep"]["L"] == 4 and cost["early_deep"]["T"] == 100
    assert cost["early_deep"]["mean"] == pytest.approx(0.12) and cost["late_deep"]["mean"] == pytest.approx(0.005)
    assert cost["tolerance"]["mean"] == pytest.approx(0.025)
    assert cost["early_costs_more_than_noise"] and cost["late_within_noise"]
