"""When did each block converge? Three detection rules on tidy layer-metric frames.

Input: the tidy frame of :func:`analysis.io.load_layer_metrics` (``step, block, metric, value``,
optionally ``run_id``) for ONE run. Output of every rule: a ``pd.Series`` indexed by ``block``
(name ``converged_step``, dtype ``Int64``) holding the convergence step, ``<NA>`` for a block
that never converged under the rule.

Rules (docs/architecture.md, "Method choices"):

- ``posthoc`` (``cka_final``): block b converged at the first probe step s after which its
  ``cka_final`` stays >= threshold at every later probe. ``cka_final`` compares each probe
  with the LAST probe, so the last probe is 1.0 by construction; a block whose only
  qualifying probe is the last one has therefore NOT converged. A transient rise above the
  threshold followed by a dip does not count: the whole suffix must stay above.
- ``online`` (``cka_prev``): converged once ``cka_prev`` (similarity with the previous probe)
  has been >= threshold for ``patience`` consecutive probes. This rule only looks backward,
  as an online freezer would during training. ``report="end"`` (default) gives the probe at
  which the streak reached ``patience`` (when an online rule would act); ``report="start"``
  gives the earlier probe of the first similar pair, i.e. the step from which the features
  stayed put (comparable to the post-hoc step). ``cka_prev`` at the first probe (step 0) has
  no previous probe and is ignored.
- ``gradnorm`` (``grad_norm``, AutoFreeze / PipeTransformer style): the per-block gradient
  norm is smoothed with a trailing mean over ``window`` log steps; its relative change
  against the previous, non-overlapping window, ``|m_t - m_{t-w}| / |m_{t-w}|``, must stay
  below ``eps`` for ``patience`` consecutive log steps; the step where that happens (the end
  of the streak) is reported. Causal, like ``online``; it lags the true convergence by up to
  about ``2 * window + patience`` log steps.

The order statistic (:func:`order_statistics`) correlates depth with convergence step.

Over a group of seeds (:func:`group_convergence`, built from :func:`mean_over_runs`,
:func:`group_steps` and :func:`group_order`): the metric averaged over the runs on their common
logged steps, each block's convergence step as a mean with its 95% t interval over seeds, and
the depth-order rho over seeds as the study's S1 claim reads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd

from core.errors import LayerLockError

Method = Literal["posthoc", "online", "gradnorm"]

# Metric each rule reads and its defaults. For ``gradnorm`` the "threshold" is ``eps``.
RULES: dict[str, dict[str, Any]] = {
    "posthoc": {"metric": "cka_final", "threshold": 0.95, "patience": None},
    "online": {"metric": "cka_prev", "threshold": 0.99, "patience": 3},
    "gradnorm": {"metric": "grad_norm", "threshold": 0.05, "patience": 3},
}
DEFAULT_GRADNORM_WINDOW = 5


def single_run_id(layer_df: pd.DataFrame) -> str | None:
    """The frame's single ``run_id`` (None when the column is absent or empty)."""
    if "run_id" not in layer_df.columns:
        return None
    ids = layer_df["run_id"].dropna().unique()
    if len(ids) > 1:
        raise LayerLockError(f"layer metrics hold {len(ids)} runs ({', '.join(map(str, ids[:3]))}, ...); pass one run")
    return str(ids[0]) if len(ids) and str(ids[0]) else None


def metric_wide(layer_df: pd.DataFrame, metric: str, needed_by: str = "") -> pd.DataFrame:
    """``metric`` as a step x block table (index ``step`` ascending, columns ``block`` ascending).

    Raises LayerLockError naming the metric and the run when the frame has no such rows.
    """
    run = single_run_id(layer_df)
    rows = layer_df[layer_df["metric"] == metric]
    if rows.empty:
        who = f"run {run}" if run else "the layer metrics"
        why = f" (needed by the {needed_by} rule)" if needed_by else ""
        raise LayerLockError(f"{who} has no '{metric}' per-block metric{why}")
    wide = rows.groupby(["step", "block"])["value"].last().unstack("block")
    return wide.sort_index().sort_index(axis=1).astype(float)


def _steps_or_na(wide: pd.DataFrame, row_index: np.ndarray) -> pd.Series:
    """Map per-block row positions (-1: none) to the step at that row, ``<NA>`` for -1."""
    steps = wide.index.to_numpy()
    values = [int(steps[i]) if i >= 0 else pd.NA for i in row_index]
    out = pd.Series(pd.array(values, dtype="Int64"), index=wide.columns.astype(int), name="converged_step")
    out.index.name = "block"
    return out


def _first_true(mask: np.ndarray) -> np.ndarray:
    """Per column, the first row index where ``mask`` is True, -1 if never. mask: (rows, cols)."""
    if mask.shape[0] == 0:
        return np.full(mask.shape[1], -1)
    first = mask.argmax(axis=0)
    return np.where(mask.any(axis=0), first, -1)


def _streaks(ok: np.ndarray) -> np.ndarray:
    """Length of the run of consecutive True ending at each row, per column. ok: (rows, cols)."""
    out = np.zeros(ok.shape, dtype=np.int64)
    current = np.zeros(ok.shape[1], dtype=np.int64)
    for i, row in enumerate(ok):  # rows are probes or log steps: hundreds at most per block
        current = np.where(row, current + 1, 0)
        out[i] = current
    return out


def posthoc_convergence(layer_df: pd.DataFrame, threshold: float = 0.95) -> pd.Series:
    """First probe step from which ``cka_final`` stays >= ``threshold`` to the end.

    The last probe does not count as a convergence point (it is 1.0 by construction), so a
    block must reach the threshold strictly before the last probe step. NaN counts as below.
    """
    wide = metric_wide(layer_df, "cka_final", "posthoc")
    ok = wide.ge(threshold).to_numpy()  # NaN >= t is False
    # suffix[i, b]: ok at row i and at every later row (reverse cumulative AND).
    suffix = np.logical_and.accumulate(ok[::-1], axis=0)[::-1]
    first = _first_true(suffix[:-1])  # exclude the last probe row
    return _steps_or_na(wide, first)


def online_convergence(
    layer_df: pd.DataFrame,
    threshold: float = 0.99,
    patience: int = 3,
    report: Literal["end", "start"] = "end",
) -> pd.Series:
    """First time ``cka_prev`` has been >= ``threshold`` for ``patience`` consecutive probes.

    ``report="end"``: the probe step completing the streak (when an online rule would know).
    ``report="start"``: the probe before the streak's first similar probe, i.e. the first step
    of the interval over which the features stopped changing.
    """
    if patience < 1:
        raise LayerLockError(f"patience must be >= 1, got {patience}")
    if report not in ("end", "start"):
        raise ValueError(f"report must be 'end' or 'start', not {report!r}")
    wide = metric_wide(layer_df, "cka_prev", "online")
    ok = wide.ge(threshold).to_numpy(copy=True)  # pandas 3 may hand out a read-only view
    # The first probe (step 0) has no previous probe to compare with; its value means nothing.
    ok[:1] = False
    end = _first_true(_streaks(ok) >= patience)
    if report == "end":
        return _steps_or_na(wide, end)
    # Probe i is similar to probe i-1. A streak of `patience` ending at row e begins at row
    # e-patience+1 (>= 1, as row 0 never counts), so stability began at row e-patience >= 0.
    return _steps_or_na(wide, np.where(end >= 0, end - patience, -1))


def gradnorm_convergence(
    layer_df: pd.DataFrame,
    eps: float = 0.05,
    window: int = DEFAULT_GRADNORM_WINDOW,
    patience: int = 3,
) -> pd.Series:
    """First log step where the smoothed ``grad_norm`` changed by < ``eps`` (relative) for
    ``patience`` consecutive log steps (see the module docstring for the exact definition)."""
    if window < 1 or patience < 1:
        raise LayerLockError(f"window and patience must be >= 1, got window={window}, patience={patience}")
    wide = metric_wide(layer_df, "grad_norm", "gradnorm")
    smooth = wide.rolling(window, min_periods=window).mean()
    prev = smooth.shift(window)
    num = (smooth - prev).abs().to_numpy()
    den = prev.abs().to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(den > 0, num / den, np.where(num == 0, 0.0, np.inf))  # 0 -> 0 is "no change"
    rel[np.isnan(num)] = np.nan  # windows not yet full
    ok = np.nan_to_num(rel, nan=np.inf) < eps
    end = _first_true(_streaks(ok) >= patience)
    return _steps_or_na(wide, end)


def check_threshold(method: str, threshold: float | None) -> None:
    """A usable threshold for ``method``: CKA rules compare with a similarity in (0, 1]; the
    gradient-norm rule with a positive ratio. Raises LayerLockError (bad input), None is the default."""
    if threshold is None:
        return
    if not math.isfinite(threshold):
        raise LayerLockError(f"threshold must be a finite number, got {threshold}")
    if method in ("posthoc", "online") and not 0 < threshold <= 1:
        raise LayerLockError(f"threshold={threshold} for the {method} rule: a CKA similarity must be in (0, 1]")
    if method == "gradnorm" and threshold <= 0:
        raise LayerLockError(f"threshold={threshold} for the gradnorm rule must be positive")


def detect_convergence(
    layer_df: pd.DataFrame,
    method: Method = "posthoc",
    threshold: float | None = None,
    patience: int | None = None,
    window: int = DEFAULT_GRADNORM_WINDOW,
) -> pd.Series:
    """Dispatch to one rule; ``None`` arguments take the rule's defaults (see ``RULES``)."""
    if method not in RULES:
        raise LayerLockError(f"unknown convergence method '{method}' (choose from {', '.join(RULES)})")
    check_threshold(method, threshold)
    t = RULES[method]["threshold"] if threshold is None else threshold
    p = RULES[method]["patience"] if patience is None else patience
    if method == "posthoc":
        return posthoc_convergence(layer_df, t)
    if method == "online":
        return online_convergence(layer_df, t, p)
    return gradnorm_convergence(layer_df, t, window, p)


def order_statistics(conv: pd.Series) -> dict[str, float | None]:
    """Rank correlation of depth (the block index) with convergence step.

    Blocks that never converged are treated as converging after the end (they rank last,
    tied among themselves), so "deep blocks never converge" still counts as depth-ordered.
    Returns None for both statistics when fewer than two blocks converged or when all
    values are equal (the correlation is undefined).
    """
    from scipy import stats  # imported where needed: most callers never rank

    steps = pd.to_numeric(conv.sort_index(), errors="coerce").astype(float)
    none: dict[str, float | None] = {"spearman_rho": None, "kendall_tau": None}
    if int(steps.notna().sum()) < 2:
        return none
    filled = steps.fillna(steps.max() + 1.0)
    if filled.nunique() < 2:
        return none
    depth = np.asarray(steps.index, dtype=float)
    rho = float(stats.spearmanr(depth, filled.to_numpy()).statistic)
    tau = float(stats.kendalltau(depth, filled.to_numpy()).statistic)
    return {
        "spearman_rho": None if math.isnan(rho) else rho,
        "kendall_tau": None if math.isnan(tau) else tau,
    }


def convergence_report(
    layer_df: pd.DataFrame,
    method: Method = "posthoc",
    threshold: float | None = None,
    patience: int | None = None,
    window: int = DEFAULT_GRADNORM_WINDOW,
    run_id: str | None = None,
) -> dict[str, Any]:
    """JSON-ready summary (what ``python -m analysis convergence --json`` prints).

    Keys: ``run_id, method, metric, threshold, patience, last_step, n_blocks, n_converged,
    blocks`` (list of ``{"block": int, "converged_step": int | None}``), ``spearman_rho``,
    ``kendall_tau``. For ``gradnorm`` the threshold is ``eps``; ``patience`` is None for
    ``posthoc``; ``last_step`` is the last step of the metric the rule read.
    """
    conv = detect_convergence(layer_df, method, threshold, patience, window)
    rule = RULES[method]
    stats = order_statistics(conv)
    used = layer_df[layer_df["metric"] == rule["metric"]]
    return {
        "run_id": run_id if run_id is not None else single_run_id(layer_df),
        "method": method,
        "metric": rule["metric"],
        "threshold": float(rule["threshold"] if threshold is None else threshold),
        "patience": None if method == "posthoc" else int(rule["patience"] if patience is None else patience),
        "last_step": int(used["step"].max()),
        "n_blocks": int(conv.size),
        "n_converged": int(conv.notna().sum()),
        "blocks": [{"block": int(b), "converged_step": None if pd.isna(s) else int(s)} for b, s in conv.items()],
        **stats,
    }


# ----------------------------------------------------------------------------- a group of seeds
#
# A group is one config trained with several seeds (``layerlock.group``). Its convergence view:
# the per-block metric averaged over the runs on the steps every run logged, each block's
# convergence step over seeds with its 95% t interval, and the depth-order rho over seeds (the
# study's S1 figure: :func:`analysis.claims.claim` of the per-seed rhos, "above 0").


def mean_over_runs(wides: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    """Step x block tables of several runs (:func:`metric_wide`), aligned and summarised.

    Runs may log on different step grids (another ``probe.every``, a run that stopped early):
    the tables are aligned on the steps EVERY run logged and the blocks every run has.
    Returns ``mean, sd, lo, hi`` (step x block; ``sd`` is the sample sd, ``ddof=1``, NaN for
    one run; ``lo``/``hi`` the min/max over runs) and ``n`` (runs with a finite value per cell).
    A NaN in one run's table is left out of that cell. ``logged``: run label -> how many steps
    that run logged (a run without values is left out and not listed). Raises LayerLockError when there is no
    run, or when the runs share no logged step or no block.
    """
    kept = {label: w for label, w in wides.items() if w is not None and not w.empty}
    frames = list(kept.values())
    if not frames:
        raise LayerLockError("no run of the group has values of this metric")
    steps = frames[0].index
    blocks = frames[0].columns
    for w in frames[1:]:
        steps = steps.intersection(w.index)
        blocks = blocks.intersection(w.columns)
    if len(steps) == 0:
        raise LayerLockError(f"the {len(frames)} runs share no logged step: their step grids do not overlap")
    if len(blocks) == 0:
        raise LayerLockError(f"the {len(frames)} runs share no block")
    steps, blocks = steps.sort_values(), blocks.sort_values()
    # run x step x block
    cube = np.stack([w.reindex(index=steps, columns=blocks).to_numpy(dtype=float) for w in frames])
    finite = np.isfinite(cube)
    n = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(finite, cube, 0.0).sum(axis=0)
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        sq = np.where(finite, (cube - mean) ** 2, 0.0).sum(axis=0)
        sd = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1)), np.nan)
    lo = np.where(n > 0, np.where(finite, cube, np.inf).min(axis=0), np.nan)
    hi = np.where(n > 0, np.where(finite, cube, -np.inf).max(axis=0), np.nan)

    def table(values: np.ndarray) -> pd.DataFrame:
        out = pd.DataFrame(values, index=steps, columns=blocks)
        out.index.name, out.columns.name = "step", "block"
        return out

    return {
        "mean": table(mean),
        "sd": table(sd),
        "lo": table(lo),
        "hi": table(hi),
        "n": table(n.astype(float)),
        "logged": pd.Series({label: len(w) for label, w in kept.items()}, dtype="int64"),
    }


GROUP_STEP_COLUMNS = ["block", "mean", "sd", "n", "n_runs", "ci_low", "ci_high"]


def group_steps(convs: Mapping[str, pd.Series]) -> pd.DataFrame:
    """Each block's convergence step over the runs of a group.

    ``convs``: run label -> the run's convergence steps (:func:`detect_convergence`). Returns
    one row per block (the union of the runs' blocks): ``mean, sd`` (ddof=1), ``n`` (runs in
    which the block converged), ``n_runs`` (runs), ``ci_low, ci_high`` (the 95% t interval of
    :func:`analysis.stats.t_interval`, None under two values; via :func:`analysis.claims.estimate`),
    then one column per run label with that run's step (``<NA>``: never converged). The mean and
    interval are over the runs in which the block converged; ``n`` says how many.
    """
    from analysis.claims import estimate

    labels = list(convs)
    steps = pd.DataFrame({label: pd.to_numeric(convs[label], errors="coerce").astype(float) for label in labels})
    steps = steps.sort_index()
    rows = []
    for block, values in steps.iterrows():
        est = estimate(values.dropna().tolist())
        rows.append(
            {
                "block": int(block),
                "mean": est["mean"],
                "sd": est["sd"],
                "n": est["n"],
                "n_runs": len(labels),
                "ci_low": est["ci_low"],
                "ci_high": est["ci_high"],
            }
        )
    out = pd.DataFrame(rows, columns=GROUP_STEP_COLUMNS).astype({"n": "int64", "n_runs": "int64"})
    for label in labels:
        out[label] = pd.array(steps[label].to_numpy(), dtype="Float64").astype("Int64")
    return out


def group_order(convs: Mapping[str, pd.Series]) -> dict[str, Any]:
    """The depth-order statistics over the runs of a group, as the study's S1 claim reads them.

    ``spearman_rho``: :func:`analysis.claims.claim` of the per-run rhos (mean, sd, N, 95% t
    interval, verdict on "rho > 0"); ``kendall_tau``: :func:`analysis.claims.estimate` of the
    taus; ``per_run``: label -> :func:`order_statistics`; ``undefined_runs``: runs whose rho is
    undefined (fewer than two blocks converged, or all tied), left out of the estimates.
    """
    from analysis.claims import claim, estimate

    per_run = {label: order_statistics(conv) for label, conv in convs.items()}
    rhos = [s["spearman_rho"] for s in per_run.values()]
    return {
        "spearman_rho": claim(rhos, 0.0, "above"),
        "kendall_tau": estimate([s["kendall_tau"] for s in per_run.values()]),
        "per_run": per_run,
        "undefined_runs": sum(r is None for r in rhos),
    }


def group_convergence(
    layer_frames: Mapping[str, pd.DataFrame],
    metric: str | None = None,
    method: Method = "posthoc",
    threshold: float | None = None,
    patience: int | None = None,
    window: int = DEFAULT_GRADNORM_WINDOW,
) -> dict[str, Any]:
    """Convergence over a group of seeds from each run's tidy layer metrics (one frame per run,
    as :func:`analysis.io.load_layer_metrics` returns it; keys label the runs).

    Each run's convergence is detected on its own steps (:func:`detect_convergence`); the
    shown ``metric`` (default: the rule's) is averaged over the steps all runs logged
    (:func:`mean_over_runs`). Returns ``runs`` (the labels), ``metric``, ``wide``
    (``mean_over_runs``), ``steps`` (:func:`group_steps`), ``order`` (:func:`group_order`)
    and ``convs`` (label -> that run's steps).
    """
    if not layer_frames:
        raise LayerLockError("a group needs at least one run")
    convs = {label: detect_convergence(f, method, threshold, patience, window) for label, f in layer_frames.items()}
    shown = metric or RULES[method]["metric"]
    wides = {label: metric_wide(f, shown) for label, f in layer_frames.items()}
    return {
        "runs": list(layer_frames),
        "metric": shown,
        "wide": mean_over_runs(wides),
        "steps": group_steps(convs),
        "order": group_order(convs),
        "convs": convs,
    }
