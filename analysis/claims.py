"""A study's claims over seeds: an estimate with its interval, and a verdict.

An *estimate* is what one figure measured over seeds amounts to: the finite values, their
mean, sample sd (``ddof=1``), N and the 95% t interval of :func:`analysis.stats.t_interval`
(None with fewer than two values). Two kinds of verdict are read off it:

- a **claim** that the figure lies on one side of a threshold (:func:`claim_verdict`):
  ``"held"`` when the whole interval lies on the claimed side, ``"not held"`` when it lies on
  the other side, ``"inconclusive"`` when it contains the threshold; ``"one seed"`` without an
  interval, ``"n/a"`` without values;
- a **difference** between two methods, paired on the seed (:func:`difference_verdict`):
  :func:`analysis.stats.verdict`, ``"no difference"`` when the interval contains 0, else
  ``"higher"`` or ``"lower"``.

:func:`freeze_cost` is the study's figure of what freezing costs against the seed noise. Pure
functions of plain numbers and frames (``experiments/study.py`` states the claims and reads the runs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import pandas as pd

from analysis.stats import t_interval, verdict

HELD, NOT_HELD, INCONCLUSIVE, ONE_SEED, NO_VALUES = "held", "not held", "inconclusive", "one seed", "n/a"


def estimate(values: Iterable[float | None]) -> dict[str, Any]:
    """``values, n, mean, sd, ci_low, ci_high`` of the finite values (None where undefined)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    mean = sum(xs) / n if n else None
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    ci = t_interval(xs)
    return {
        "values": xs,
        "n": n,
        "mean": mean,
        "sd": sd,
        "ci_low": ci[0] if ci else None,
        "ci_high": ci[1] if ci else None,
    }


def claim_verdict(est: dict[str, Any], threshold: float = 0.0, side: Literal["above", "below"] = "above") -> str:
    """Whether the estimate's interval lies ``side`` of ``threshold`` (module docstring)."""
    if not est["n"]:
        return NO_VALUES
    if est["ci_low"] is None:
        return ONE_SEED
    low, high = est["ci_low"], est["ci_high"]
    beyond, short = (low > threshold, high < threshold) if side == "above" else (high < threshold, low > threshold)
    return HELD if beyond else (NOT_HELD if short else INCONCLUSIVE)


def difference_verdict(est: dict[str, Any]) -> str:
    """:func:`analysis.stats.verdict` of a paired-difference estimate ("no difference" when its
    interval contains 0)."""
    ci = None if est["ci_low"] is None else (est["ci_low"], est["ci_high"])
    return verdict(est["mean"], ci, est["n"])


def claim(
    values: Iterable[float | None], threshold: float = 0.0, side: Literal["above", "below"] = "above"
) -> dict[str, Any]:
    """The estimate of ``values`` with its :func:`claim_verdict` under ``"verdict"``."""
    est = estimate(values)
    return {**est, "verdict": claim_verdict(est, threshold, side)}


def difference(values: Iterable[float | None]) -> dict[str, Any]:
    """The estimate of paired differences with its :func:`difference_verdict` under ``"verdict"``."""
    est = estimate(values)
    return {**est, "verdict": difference_verdict(est)}


def format_estimate(est: dict[str, Any], pct: bool = False) -> str:
    """``"+0.120 [+0.050, +0.190] (N=3)"`` (``pct``: as signed percentages); ``"n/a"`` without values."""
    if est["mean"] is None:
        return "n/a"

    def f(v: float) -> str:
        return f"{100 * v:+.1f}%" if pct else f"{v:+.3f}"

    if est["ci_low"] is None:
        return f"{f(est['mean'])} (N={est['n']})"
    return f"{f(est['mean'])} [{f(est['ci_low'])}, {f(est['ci_high'])}] (N={est['n']})"


def freeze_cost(ratios: Sequence[pd.DataFrame], tolerances: Sequence[float]) -> dict[str, Any]:
    """What freezing costs against the seed noise, over seeds: the mean freeze-test ratio per
    (L, T), and the deepest tested prefix frozen at the first and at the last tested T against
    the tolerance (``ratios``: one ``FreezeGrid.ratio`` per seed, index L, columns T, the same
    cells for every seed; ``tolerances``: each seed's tolerance)."""
    mean = pd.concat(ratios).groupby(level=0).mean()
    steps, blocks = list(mean.columns), list(mean.index)
    early_deep = [float(r.loc[blocks[-1], steps[0]]) - 1 for r in ratios]
    late_deep = [float(r.loc[blocks[-1], steps[-1]]) - 1 for r in ratios]
    tol = estimate(tolerances)
    ed, ld = estimate(early_deep), estimate(late_deep)
    return {
        "mean_ratio": {str(L): {str(T): float(mean.loc[L, T]) for T in steps} for L in blocks},
        "early_deep": {"T": int(steps[0]), "L": int(blocks[-1]), **ed},
        "late_deep": {"T": int(steps[-1]), "L": int(blocks[-1]), **ld},
        "tolerance": tol,
        "early_costs_more_than_noise": bool(
            ed["mean"] is not None and tol["mean"] is not None and ed["mean"] > tol["mean"]
        ),
        "late_within_noise": bool(ld["mean"] is not None and tol["mean"] is not None and ld["mean"] <= tol["mean"]),
    }
