"""Compare runs (MAE vs LayerLock): loss, compute, wall time, probes, collapse indicators.

The pure functions take the tidy frames of :mod:`analysis.io` (history:
``run_id, step, metric, value``; layer metrics: ``run_id, step, block, metric, value``).
Only :func:`compare_runs` and :func:`freeze_test_grid` load anything, and only through ``io``.

Conventions:

- ``final_loss`` is the mean of the last ``last`` (default 3) logged values of ``train/loss``:
  one logged value is a single noisy minibatch.
- ``flop_saving = 1 - total_flops / total_flops_mae`` against the FIRST run with method
  ``mae`` in the list (NaN when there is none); ``wall_saving`` likewise with ``wall_s``.
- Collapse indicators are read at the last probe step: the mean and min over blocks of
  ``eff_rank`` and the mean of ``feat_std``; a collapsed run (``latent_naive``) has both small.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis import io
from core.errors import LayerLockError

FINAL_LAST = 3
COMPARE_COLUMNS = [
    "run_id", "name", "method", "dataset", "status", "steps", "final_loss", "final_loss_pixel",
    "total_flops", "wall_s", "flop_saving", "wall_saving", "eff_rank_mean", "eff_rank_min",
    "feat_std_mean", "feat_std_min",
]
# Run-level keys compare_runs reads (the history of all train/* keys is not needed).
_HISTORY_KEYS = ("train/loss", "train/loss_pixel", "train/flops", "train/wall_s")


def _series(history: pd.DataFrame, metric: str) -> pd.Series:
    """One metric of one run as a step-indexed Series, sorted by step."""
    rows = history[history["metric"] == metric]
    return rows.groupby("step")["value"].last().sort_index()


def _single_run(history: pd.DataFrame) -> None:
    if "run_id" in history.columns and history["run_id"].nunique() > 1:
        raise LayerLockError("expected the history of one run, got several run ids")


def final_value(history: pd.DataFrame, metric: str = "train/loss", last: int = FINAL_LAST) -> float:
    """Mean of the last ``last`` logged values of ``metric`` (NaN when never logged)."""
    values = _series(history, metric)
    return float(values.iloc[-last:].mean()) if len(values) else float("nan")


def last_value(history: pd.DataFrame, metric: str) -> float:
    """The value at the largest logged step (cumulative metrics: ``train/flops``, ``train/wall_s``)."""
    values = _series(history, metric)
    return float(values.iloc[-1]) if len(values) else float("nan")


def collapse_indicators(layer_df: pd.DataFrame) -> dict[str, float]:
    """``eff_rank_mean``, ``eff_rank_min``, ``feat_std_mean``, ``feat_std_min`` over blocks at the last probe step."""
    out = {"eff_rank_mean": float("nan"), "eff_rank_min": float("nan"), "feat_std_mean": float("nan"),
           "feat_std_min": float("nan")}
    for metric, stats in (("eff_rank", ("mean", "min")), ("feat_std", ("mean", "min"))):
        rows = layer_df[layer_df["metric"] == metric]
        if rows.empty:
            continue
        final = rows[rows["step"] == rows["step"].max()]["value"]
        for stat in stats:
            out[f"{metric}_{stat}"] = float(getattr(final, stat)())
    return out


def summarize_run(
    meta: dict[str, Any],
    history: pd.DataFrame,
    layer_df: pd.DataFrame | None = None,
    evals: dict[str, float] | None = None,
    last: int = FINAL_LAST,
) -> dict[str, Any]:
    """One comparison row (savings are added across rows by :func:`add_savings`).

    ``meta`` supplies ``run_id, name, method, dataset, status, steps`` (missing keys -> None).
    """
    _single_run(history)
    row: dict[str, Any] = {k: meta.get(k) for k in ("run_id", "name", "method", "dataset", "status", "steps")}
    row.update(
        final_loss=final_value(history, "train/loss", last),
        final_loss_pixel=final_value(history, "train/loss_pixel", last),
        total_flops=last_value(history, "train/flops"),
        wall_s=last_value(history, "train/wall_s"),
    )
    row.update(collapse_indicators(layer_df if layer_df is not None else pd.DataFrame(columns=io.LAYER_COLUMNS)))
    row.update(evals or {})
    return row


def add_savings(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``flop_saving`` and ``wall_saving`` against the first ``mae`` row (NaN without one)."""
    out = frame.copy()
    mae = out.index[out["method"] == "mae"] if "method" in out.columns else []
    for col, base in (("flop_saving", "total_flops"), ("wall_saving", "wall_s")):
        if len(mae):
            ref = float(out.loc[mae[0], base])
            out[col] = 1.0 - out[base].astype(float) / ref if ref > 0 else np.nan
        else:
            out[col] = np.nan
    return out


def comparison_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Rows of :func:`summarize_run` -> the comparison table (``COMPARE_COLUMNS`` + eval columns)."""
    frame = pd.DataFrame(list(rows)) if rows else pd.DataFrame(columns=COMPARE_COLUMNS)
    frame = add_savings(frame)
    evals = sorted(c for c in frame.columns if c not in COMPARE_COLUMNS)
    frame = frame.reindex(columns=COMPARE_COLUMNS + evals)
    frame["steps"] = frame["steps"].astype("Int64")
    return frame


def compare_runs(
    run_ids: Sequence[str],
    uri: str | None = None,
    include_block_evals: bool = False,
    last: int = FINAL_LAST,
) -> pd.DataFrame:
    """Load each run through ``io`` and build the comparison table, one row per run in order."""
    rows = []
    for run_id in run_ids:
        record = io.get_run(run_id, uri)
        history = io.load_history(run_id, _HISTORY_KEYS, uri)
        layer_df = io.load_layer_metrics(run_id, uri, metrics=("eff_rank", "feat_std"))
        meta = {"run_id": record.run_id, "name": record.name, "method": record.method,
                "dataset": record.dataset, "status": record.status, "steps": record.param_int("train.steps")}
        evals = io.eval_metrics(record.metrics, include_block_evals)
        rows.append(summarize_run(meta, history, layer_df, evals, last))
    return comparison_frame(rows)


# ----------------------------------------------------------------------------- equal-step / equal-cost views

def _as_frame(histories: pd.DataFrame | Iterable[pd.DataFrame]) -> pd.DataFrame:
    if isinstance(histories, pd.DataFrame):
        return histories
    frames = list(histories)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=io.HISTORY_COLUMNS)


def loss_at_steps(
    histories: pd.DataFrame | Iterable[pd.DataFrame],
    steps: Sequence[int],
    metric: str = "train/loss",
    window: int = 1,
) -> pd.DataFrame:
    """``metric`` of each run at equal steps: rows ``run_id``, columns the requested steps.

    The value at step s is the mean of the last ``window`` values logged at or before s
    (NaN when nothing was logged by then), so runs with different log intervals line up.
    """
    frame = _as_frame(histories)
    out: dict[str, list[float]] = {}
    for run_id, run_hist in frame.groupby("run_id", sort=False):
        series = _series(run_hist, metric)
        logged = series.index.to_numpy()
        values = []
        for s in steps:
            n = int(np.searchsorted(logged, s, side="right"))  # entries with step <= s
            values.append(float(series.iloc[max(0, n - window):n].mean()) if n else float("nan"))
        out[str(run_id)] = values
    result = pd.DataFrame.from_dict(out, orient="index", columns=list(steps))
    result.index.name = "run_id"
    return result


def _cost_to_reach(history: pd.DataFrame, target: float, cost_metric: str, metric: str, smooth: int) -> float | None:
    _single_run(history)
    loss = _series(history, metric).rolling(max(1, smooth), min_periods=1).mean()
    reached = loss[loss <= target]
    if reached.empty:
        return None
    step = reached.index[0]
    cost = _series(history, cost_metric)
    cost = cost[cost.index <= step]
    return float(cost.iloc[-1]) if len(cost) else None


def flops_to_reach(
    history: pd.DataFrame, target_loss: float, metric: str = "train/loss", smooth: int = 1
) -> float | None:
    """Cumulative ``train/flops`` when ``metric`` (trailing mean over ``smooth`` logged values)
    first reaches ``target_loss``; None if it never does. One run's history."""
    return _cost_to_reach(history, target_loss, "train/flops", metric, smooth)


def wall_to_reach(
    history: pd.DataFrame, target_loss: float, metric: str = "train/loss", smooth: int = 1
) -> float | None:
    """Like :func:`flops_to_reach`, in ``train/wall_s`` seconds."""
    return _cost_to_reach(history, target_loss, "train/wall_s", metric, smooth)


# ----------------------------------------------------------------------------- freeze test

@dataclass(frozen=True)
class FreezeGrid:
    """The paper's freeze test: blocks 0..L-1 frozen at step T, trained to the end.

    ``ratio``: index L (``freeze_blocks``), columns T (``freeze_step``), value = child final
    loss / baseline final loss. ``converged``: ``ratio <= 1 + tol`` (``<NA>`` where untested).
    """

    ratio: pd.DataFrame
    converged: pd.DataFrame
    baseline_final_loss: float
    tol: float

    def max_converged_prefix(self) -> pd.Series:
        """Per T: the largest tested L whose test and all smaller tested L's passed (0: none)."""
        out = {}
        for t in self.converged.columns:
            best = 0
            for blocks, ok in self.converged[t].dropna().sort_index().items():
                if not bool(ok):
                    break
                best = int(blocks)
            out[t] = best
        series = pd.Series(out, name="max_converged_prefix", dtype="int64")
        series.index.name = "freeze_step"
        return series

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: baseline, tol, and one record per tested (L, T)."""
        cells = []
        for blocks in self.ratio.index:
            for step in self.ratio.columns:
                r = self.ratio.loc[blocks, step]
                if pd.isna(r) and pd.isna(self.converged.loc[blocks, step]):
                    continue
                ok = self.converged.loc[blocks, step]
                cells.append({"blocks": int(blocks), "step": int(step),
                              "ratio": None if pd.isna(r) else float(r),
                              "converged": None if pd.isna(ok) else bool(ok)})
        return {"baseline_final_loss": self.baseline_final_loss, "tol": self.tol, "cells": cells,
                "max_converged_prefix": {str(k): int(v) for k, v in self.max_converged_prefix().items()}}


def freeze_grid_from_frames(children: pd.DataFrame, baseline_final_loss: float, tol: float = 0.02) -> FreezeGrid:
    """Pure part of :func:`freeze_test_grid`.

    ``children``: one row per child with ``freeze_step`` (T), ``freeze_blocks`` (L) and
    ``final_loss``; rows lacking T or L are ignored, repeated (L, T) cells are averaged.
    A child without a loss (e.g. failed early) appears with ratio NaN and verdict False.
    """
    if not np.isfinite(baseline_final_loss) or baseline_final_loss <= 0:
        raise LayerLockError(f"freeze test: baseline final loss must be a positive number, got {baseline_final_loss}")
    tested = children.dropna(subset=["freeze_step", "freeze_blocks"]).copy()
    tested["freeze_step"] = tested["freeze_step"].astype(int)
    tested["freeze_blocks"] = tested["freeze_blocks"].astype(int)
    tested["ratio"] = tested["final_loss"].astype(float) / baseline_final_loss
    ratio = tested.pivot_table(index="freeze_blocks", columns="freeze_step", values="ratio",
                               aggfunc="mean", dropna=False).sort_index().sort_index(axis=1)
    # Verdict: NA where untested, False where tested without a usable loss.
    present = tested.groupby(["freeze_blocks", "freeze_step"]).size().unstack("freeze_step")
    present = present.reindex(index=ratio.index, columns=ratio.columns)
    converged = (ratio <= 1.0 + tol).astype("boolean").where(present.notna(), pd.NA)
    return FreezeGrid(ratio=ratio.astype(float), converged=converged,
                      baseline_final_loss=float(baseline_final_loss), tol=float(tol))


def freeze_test_grid(parent_id: str, uri: str | None = None, tol: float = 0.02, last: int = FINAL_LAST) -> FreezeGrid:
    """Load a freeze-test parent and its children; final losses are last-``last`` means."""
    parent = io.load_history(parent_id, ["train/loss"], uri)
    baseline = final_value(parent, "train/loss", last)
    if not np.isfinite(baseline):
        raise LayerLockError(f"run {parent_id} has no train/loss to serve as the freeze-test baseline")
    children = io.find_children(parent_id, uri)
    if children.empty:
        raise LayerLockError(
            f"run {parent_id} has no freeze-test children (no runs tagged {io.TAG_PARENT}={parent_id})")
    children = children.copy()
    children["final_loss"] = [final_value(io.load_history(rid, ["train/loss"], uri), "train/loss", last)
                              for rid in children["run_id"]]
    grid = freeze_grid_from_frames(children, baseline, tol)
    if grid.ratio.empty:
        raise LayerLockError(f"run {parent_id}: no child carries both {io.TAG_FREEZE_STEP} and {io.TAG_FREEZE_BLOCKS}")
    return grid
