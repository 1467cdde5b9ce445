"""Statistics over groups of seeds: mean, spread and N; paired differences with a t interval.

A *group* is one config trained with several seeds (the ``layerlock.group`` tag: runs that
differ only in ``train.seed``). Methods are compared as groups, not as single runs, because one
run's final loss moves with its seed.

Conventions:

- ``sd`` is the sample standard deviation (``ddof=1``); it is NaN for a group of one run.
  ``n`` counts the runs with a finite value of that metric.
- Pairing: two groups are compared seed by seed. The run of group A and the run of group B
  with the same ``train.seed`` share their data order, masks and initialisation, so the
  difference ``b - a`` of a pair removes that shared seed-to-seed noise. Seeds present in only
  one group are left out; a group holding one seed twice (e.g. a re-run) contributes the mean
  of those runs.
- The interval is the 95% **t interval** for the mean paired difference:
  ``mean ± t(0.975, N-1) * sd / sqrt(N)`` with Student's t on N-1 degrees of freedom
  (``scipy.stats.t``). With one pair there is no spread to estimate: the interval is None and
  the verdict ``"n/a (one seed)"``.
- Verdict: ``"no difference"`` when the interval contains 0; otherwise ``"higher"`` or
  ``"lower"``: group B's value is above or below group A's (for a loss, "lower" is better).

Pure pandas/numpy/scipy: the frames come from :mod:`analysis.compare` (one row per run with a
``group`` column, a ``seed`` column and metric columns).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from core.errors import LayerLockError
from core.timemodel import median_interval  # noqa: F401  (timings: a median and its distribution-free interval)

CONFIDENCE = 0.95
INTERVAL_NAME = "95% t interval"
NO_DIFFERENCE = "no difference"
ONE_SEED = "n/a (one seed)"
NO_PAIRS = "n/a (no common seeds)"
SUMMARY_COLUMNS = ["metric", "mean", "sd", "n"]


def _require(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LayerLockError(f"statistics: the run table lacks column(s) {', '.join(missing)}")


def _numeric(values: pd.Series) -> pd.Series:
    out = pd.to_numeric(values, errors="coerce").astype(float)
    return out[np.isfinite(out)]


def group_summary(frame: pd.DataFrame, metrics: Sequence[str], by: str = "group") -> pd.DataFrame:
    """Mean, sample sd and N of each metric per group, tidy: ``<by>, metric, mean, sd, n``.

    Groups keep their order of first appearance in ``frame``; metrics the order given (a metric
    absent from ``frame`` is skipped). Non-finite values are not counted.
    """
    _require(frame, [by])
    rows = []
    for group, part in frame.groupby(by, sort=False):
        for metric in metrics:
            if metric not in part.columns:
                continue
            values = _numeric(part[metric])
            n = len(values)
            rows.append(
                {
                    by: group,
                    "metric": metric,
                    "mean": float(values.mean()) if n else math.nan,
                    "sd": float(values.std(ddof=1)) if n > 1 else math.nan,
                    "n": n,
                }
            )
    return pd.DataFrame(rows, columns=[by, *SUMMARY_COLUMNS]).astype({"n": "int64"})


def t_interval(diffs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Student's t interval for the mean of ``diffs`` (None for fewer than two values)."""
    from scipy import stats

    values = np.asarray(diffs, dtype=float)
    n = len(values)
    if n < 2:
        return None
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def verdict(mean: float | None, interval: tuple[float, float] | None, n: int) -> str:
    """``"no difference"`` if ``interval`` contains 0, else ``"higher"``/``"lower"`` (B against A)."""
    if n == 0 or mean is None:
        return NO_PAIRS
    if interval is None:
        return ONE_SEED
    low, high = interval
    if low <= 0.0 <= high:
        return NO_DIFFERENCE
    return "higher" if mean > 0 else "lower"


def _per_seed(frame: pd.DataFrame, metric: str, group: Any, by: str, pair_on: str) -> pd.Series:
    part = frame[frame[by] == group]
    values = pd.DataFrame({"seed": part[pair_on], "value": pd.to_numeric(part[metric], errors="coerce")})
    values = values[values["seed"].notna() & np.isfinite(values["value"].astype(float))]
    return values.groupby("seed")["value"].mean()  # a seed run twice: the mean of its runs


def paired_differences(
    frame: pd.DataFrame,
    metric: str,
    group_a: Any,
    group_b: Any,
    pair_on: str = "seed",
    by: str = "group",
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Paired difference ``b - a`` of ``metric`` between two groups, pairs matched on ``pair_on``.

    Returns ``metric, group_a, group_b, mean_diff, sd, n`` (pairs), ``interval`` (the name,
    ``"95% t interval"``), ``ci_low``, ``ci_high`` (None for fewer than two pairs), ``verdict``
    and ``pairs`` (the seeds used, sorted).
    """
    _require(frame, [by, pair_on, metric])
    a = _per_seed(frame, metric, group_a, by, pair_on)
    b = _per_seed(frame, metric, group_b, by, pair_on)
    common = sorted(set(a.index) & set(b.index))
    diffs = np.array([b[s] - a[s] for s in common], dtype=float)
    n = len(diffs)
    mean = float(diffs.mean()) if n else None
    interval = t_interval(diffs, confidence)
    return {
        "metric": metric,
        "group_a": group_a,
        "group_b": group_b,
        "mean_diff": mean,
        "sd": float(diffs.std(ddof=1)) if n > 1 else None,
        "n": n,
        "interval": f"{confidence:.0%} t interval",
        "ci_low": interval[0] if interval else None,
        "ci_high": interval[1] if interval else None,
        "verdict": verdict(mean, interval, n),
        "pairs": [_plain(s) for s in common],
    }


def paired_against(
    frame: pd.DataFrame,
    metrics: Sequence[str],
    baseline: Any,
    groups: Sequence[Any] | None = None,
    pair_on: str = "seed",
    by: str = "group",
) -> pd.DataFrame:
    """:func:`paired_differences` of every group but ``baseline`` against it, for each metric
    present in ``frame`` (one row per group and metric, groups in the order given)."""
    _require(frame, [by])
    if groups is None:
        groups = list(dict.fromkeys(frame[by]))
    if baseline not in set(frame[by]):
        raise LayerLockError(f"baseline group '{baseline}' is not among the compared groups")
    rows = [
        paired_differences(frame, m, baseline, g, pair_on, by)
        for g in groups
        if g != baseline
        for m in metrics
        if m in frame.columns
    ]
    columns = [
        "metric",
        "group_a",
        "group_b",
        "mean_diff",
        "sd",
        "n",
        "interval",
        "ci_low",
        "ci_high",
        "verdict",
        "pairs",
    ]
    return pd.DataFrame(rows, columns=columns)


def format_mean_sd(mean: float, sd: float, n: int, fmt: str = "{:.4g}") -> str:
    """``"0.512 ± 0.004 (3)"``; ``"0.512 (1)"`` without a spread; ``"n/a"`` without values."""
    if not n or mean is None or not math.isfinite(mean):
        return "n/a"
    if sd is None or not math.isfinite(sd):
        return f"{fmt.format(mean)} ({n})"
    return f"{fmt.format(mean)} ± {fmt.format(sd)} ({n})"


def summary_table(summary: pd.DataFrame, by: str = "group", fmt: str = "{:.4g}") -> pd.DataFrame:
    """The tidy :func:`group_summary` as text, groups x metrics, each cell ``mean ± sd (N)``."""
    if summary.empty:
        return pd.DataFrame()
    cells = summary.assign(
        text=[
            format_mean_sd(m, s, n, fmt) for m, s, n in zip(summary["mean"], summary["sd"], summary["n"], strict=True)
        ]
    )
    table = cells.pivot(index=by, columns="metric", values="text")
    order_rows = list(dict.fromkeys(summary[by]))
    order_cols = list(dict.fromkeys(summary["metric"]))
    return table.reindex(index=order_rows, columns=order_cols)


def spread_over_runs(curves: Mapping[str, pd.DataFrame], on: str = "step", x: str = "x", y: str = "y") -> pd.DataFrame:
    """A group's curve: at each value of ``on`` (a logged step), the mean, sd, min and max of
    ``y`` over the runs that logged it, and the mean of ``x`` (the step itself, or FLOPs or wall
    time, which differ slightly between seeds).

    ``curves``: run id -> frame with columns ``on``, ``x``, ``y``. Returns
    ``step, x, mean, sd, lo, hi, n`` (``lo``/``hi``: min/max over runs; ``sd`` NaN where n is 1),
    sorted by ``on``.
    """
    parts = [
        frame[[on, x, y]].assign(run=str(run)).rename(columns={on: "_on", x: "_x", y: "_y"})
        for run, frame in curves.items()
        if not frame.empty
    ]
    columns = ["step", "x", "mean", "sd", "lo", "hi", "n"]
    if not parts:
        return pd.DataFrame(columns=columns)
    long = pd.concat(parts, ignore_index=True).dropna(subset=["_y"])
    grouped = long.groupby("_on")
    out = pd.DataFrame(
        {
            "step": grouped["_y"].mean().index.to_numpy(),
            "x": grouped["_x"].mean().to_numpy(),
            "mean": grouped["_y"].mean().to_numpy(),
            "sd": grouped["_y"].std(ddof=1).to_numpy(),
            "lo": grouped["_y"].min().to_numpy(),
            "hi": grouped["_y"].max().to_numpy(),
            "n": grouped["_y"].count().to_numpy(),
        }
    )
    return out.sort_values("step").reset_index(drop=True)


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x
