"""Compare runs (MAE vs LayerLock): loss, compute, wall time, probes, collapse indicators.

Pure functions of the tidy frames and run records of :mod:`analysis.records` (history:
``run_id, step, metric, value``; layer metrics: ``run_id, step, block, metric, value``). The
caller reads the runs through ``analysis.io``: :func:`compare_runs` and :func:`compare_groups`
take runs read with ``COMPARE_PARTS``, :func:`freeze_test_grid` a freeze test read with
``FINAL_LOSS_PARTS`` (``io.load_freeze_test``).

Conventions:

- ``final_loss`` is the mean of the last ``last`` (default 3) logged values of ``train/loss``:
  one logged value is a single noisy minibatch.
- Run by run (:func:`compare_runs`): ``flop_saving = 1 - total_flops / total_flops_mae`` against
  the FIRST run with method ``mae`` in the list (NaN when there is none); ``wall_saving``
  likewise with ``wall_s``, ``cpu_saving`` with ``cpu_s`` (CPU time: on a shared machine the
  one that two runs made at different loads can be compared on).
- Groups of seeds (:func:`compare_groups`): each name is a ``layerlock.group`` (its finished
  runs) or a single run id (a group of one). Savings are against the BASELINE group (default:
  the first one): ``1 - value / mean(value over the baseline's runs)``, per run; groups are
  summarised as mean, sd and N and compared with seed-paired differences and a 95% t interval
  (:mod:`analysis.stats`).
- Predicted savings (:func:`predicted_savings`): what a scheduled run's schedule was predicted
  to save against the same run with nothing frozen, from the run the schedule was derived
  from (its ``time_model.json``, else its counted FLOPs; ``predicted_from`` says which), beside
  the measured ``wall_saving``.
- Collapse indicators are read at the last probe step: the mean and min over blocks of
  ``eff_rank`` and the mean of ``feat_std``; a collapsed run (``latent_naive``) has both small.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from analysis.records import (
    LAYER_COLUMNS,
    FreezeTestRuns,
    GroupSpec,
    Parts,
    RunData,
    children_frame,
    eval_metrics,
)
from core import schema
from core.errors import LayerLockError
from core.schema import HELDOUT_KEY

FINAL_LAST = 3
COMPARE_COLUMNS = [
    "run_id",
    "name",
    "method",
    "dataset",
    "status",
    "steps",
    "final_loss",
    "final_loss_pixel",
    "heldout_loss_pixel",
    "total_flops",
    "wall_s",
    "cpu_s",
    "flop_saving",
    "wall_saving",
    "cpu_saving",
    "predicted_flop_saving",
    "predicted_wall_saving",
    "predicted_cpu_saving",
    "predicted_from",
    "wall_saving_within_run",
    "eff_rank_mean",
    "eff_rank_min",
    "feat_std_mean",
    "feat_std_min",
]
# What a comparison reads of each run (the history of all train/* keys is not needed), and what
# a freeze test reads of its runs (final_losses).
COMPARE_PARTS = Parts(
    history=(schema.LOSS, schema.LOSS_PIXEL, HELDOUT_KEY, schema.FLOPS, schema.WALL_S, schema.CPU_S),
    layers=("eff_rank", "feat_std"),
    flop_model=True,
    time_model=True,
    schedule=True,
    source=True,
)
FINAL_LOSS_PARTS = Parts(history=(HELDOUT_KEY, schema.LOSS))
# Columns a group comparison adds to each run row, and the ones summarised per group
# (followed by every eval/<task>/<metric> column).
GROUP_COLUMNS = ["group", "seed"]
STAT_COLUMNS = [
    "final_loss",
    "final_loss_pixel",
    "heldout_loss_pixel",
    "total_flops",
    "wall_s",
    "flop_saving",
    "wall_saving",
    "cpu_saving",
    "predicted_wall_saving",
    "feat_std_min",
    "eff_rank_mean",
]
# Summarised per group, never differenced against the baseline (a prediction is not a measurement).
UNPAIRED = ("predicted_wall_saving", "predicted_cpu_saving")


def _series(history: pd.DataFrame, metric: str) -> pd.Series:
    """One metric of one run as a step-indexed Series, sorted by step."""
    rows = history[history["metric"] == metric]
    return rows.groupby("step")["value"].last().sort_index()


def _single_run(history: pd.DataFrame) -> None:
    if "run_id" in history.columns and history["run_id"].nunique() > 1:
        raise LayerLockError("expected the history of one run, got several run ids")


def final_value(history: pd.DataFrame, metric: str = schema.LOSS, last: int = FINAL_LAST) -> float:
    """Mean of the last ``last`` logged values of ``metric`` (NaN when never logged)."""
    values = _series(history, metric)
    return float(values.iloc[-last:].mean()) if len(values) else float("nan")


def last_value(history: pd.DataFrame, metric: str) -> float:
    """The value at the largest logged step (cumulative metrics: ``train/flops``, ``train/wall_s``)."""
    values = _series(history, metric)
    return float(values.iloc[-1]) if len(values) else float("nan")


def collapse_indicators(layer_df: pd.DataFrame) -> dict[str, float]:
    """``eff_rank_mean``, ``eff_rank_min``, ``feat_std_mean``, ``feat_std_min`` over blocks at the last probe step."""
    out = {
        "eff_rank_mean": float("nan"),
        "eff_rank_min": float("nan"),
        "feat_std_mean": float("nan"),
        "feat_std_min": float("nan"),
    }
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
        final_loss=final_value(history, schema.LOSS, last),
        final_loss_pixel=final_value(history, schema.LOSS_PIXEL, last),
        heldout_loss_pixel=last_value(history, HELDOUT_KEY),
        total_flops=last_value(history, schema.FLOPS),
        wall_s=last_value(history, schema.WALL_S),
        cpu_s=last_value(history, schema.CPU_S),
    )
    row.update(collapse_indicators(layer_df if layer_df is not None else pd.DataFrame(columns=LAYER_COLUMNS)))
    row.update(evals or {})
    return row


def add_savings(frame: pd.DataFrame, baseline: Any = None, by: str = "group") -> pd.DataFrame:
    """Add ``flop_saving``, ``wall_saving`` and ``cpu_saving``.

    Without ``baseline``: against the first ``mae`` row (NaN without one). With ``baseline``:
    against the mean over the rows whose ``by`` column equals it (a group of seeds), so each
    run's saving is ``1 - value / baseline mean`` and the baseline's own savings average 0.
    """
    out = frame.copy()
    if baseline is not None:
        rows = out[out[by] == baseline] if by in out.columns else out.iloc[0:0]
    else:
        mae = out.index[out["method"] == "mae"] if "method" in out.columns else []
        rows = out.loc[mae[:1]]
    for col, base in (("flop_saving", "total_flops"), ("wall_saving", "wall_s"), ("cpu_saving", "cpu_s")):
        if base not in out:  # e.g. runs logged before train/cpu_s existed
            out[col] = np.nan
            continue
        ref_values = pd.to_numeric(rows[base], errors="coerce").astype(float)
        ref_values = ref_values[np.isfinite(ref_values)]
        ref = float(ref_values.mean()) if len(ref_values) else float("nan")
        out[col] = 1.0 - out[base].astype(float) / ref if ref > 0 else np.nan
    return out


def comparison_frame(rows: Sequence[dict[str, Any]], baseline: Any = None, by: str = "group") -> pd.DataFrame:
    """Rows of :func:`summarize_run` -> the comparison table (``COMPARE_COLUMNS`` + eval columns).

    Rows that carry ``group`` and ``seed`` keep them, right after ``run_id``; ``baseline`` and
    ``by`` go to :func:`add_savings`.
    """
    frame = pd.DataFrame(list(rows)) if rows else pd.DataFrame(columns=COMPARE_COLUMNS)
    frame = add_savings(frame, baseline, by)
    extra = [c for c in GROUP_COLUMNS if c in frame.columns]
    evals = sorted(c for c in frame.columns if c not in COMPARE_COLUMNS and c not in extra)
    frame = frame.reindex(columns=COMPARE_COLUMNS[:1] + extra + COMPARE_COLUMNS[1:] + evals)
    frame["steps"] = frame["steps"].astype("Int64")
    if "seed" in frame.columns:
        frame["seed"] = frame["seed"].astype("Int64")
    return frame


def compare_runs(runs: Iterable[RunData], include_block_evals: bool = False, last: int = FINAL_LAST) -> pd.DataFrame:
    """The comparison table of runs read with ``COMPARE_PARTS``, one row per run in order."""
    return comparison_frame([run_row(run, include_block_evals, last) for run in runs])


def predicted_savings(run: RunData) -> dict[str, Any]:
    """What a run's schedule (``schedule.json``) was predicted to save against the same run with
    nothing frozen: ``predicted_flop_saving``, ``predicted_wall_saving`` and ``predicted_from``.

    The prediction is the one made before the run: from the models of the run its schedule was
    derived from (``layerlock.schedule_source``), when that run has the same method (its FLOPs
    and step times are this run's; a LayerLock run's latent target costs what an MAE run never
    measured). Otherwise it comes from the run's own models, measured while it trained, and
    ``predicted_from`` says so. Runs without a schedule get NaN.

    Also ``wall_saving_within_run`` (``core.timemodel.within_run_saving``): the run's wall time
    against the same steps at its own unfrozen pace (its k=0 median plus probes per step, from
    its own ``time_model.json``): a measurement of the run alone, so a change in machine load
    between it and the baseline run does not enter it (one within the run still does).
    """
    out: dict[str, Any] = {
        "predicted_flop_saving": np.nan,
        "predicted_wall_saving": np.nan,
        "predicted_cpu_saving": np.nan,
        "predicted_from": None,
        "wall_saving_within_run": np.nan,
    }
    record = run.record
    steps = record.param_int("train.steps")
    schedule = run.schedule if steps else None
    if not schedule:
        return out
    from analysis.flops import predicted_saving
    from analysis.timing import predict_wall_saving
    from core.timemodel import within_run_saving

    models, origin = run, "own"
    if run.source is not None and run.source.record.method == record.method:
        models, origin = run.source, "source"
    source = models.run_id
    flop_model, time_model = models.flop_model, models.time_model
    wall = predict_wall_saving(schedule, steps, flop_model, time_model)
    cpu = predict_wall_saving(schedule, steps, flop_model, time_model, clock="cpu")
    try:
        flop = predicted_saving(schedule, flop_model, steps) if flop_model else np.nan
    except LayerLockError:
        flop = np.nan
    out.update(
        predicted_flop_saving=flop,
        predicted_wall_saving=np.nan if wall.saving is None else wall.saving,
        predicted_cpu_saving=cpu.saving if cpu.basis == "time_model" else np.nan,
        predicted_from=f"{origin} {source[:8]}: {wall.basis}" if wall.basis else None,
    )
    own = run.time_model
    within = within_run_saving(own) if isinstance(own, dict) else None
    out["wall_saving_within_run"] = np.nan if within is None else within
    return out


def _pts(measured: Any, predicted: Any) -> str:
    """``measured - predicted`` in percentage points, as text."""
    if measured is None or predicted is None or pd.isna(measured) or pd.isna(predicted):
        return "n/a"
    return f"{100 * (float(measured) - float(predicted)):+.1f} pts"


def prediction_lines(frame: pd.DataFrame, names: dict[str, str] | None = None) -> list[str]:
    """Predicted against measured savings, one line per run that has a prediction (text for the
    command lines). ``names``: run id -> label (default: the run name)."""
    rows = (
        frame[pd.to_numeric(frame.get("predicted_wall_saving"), errors="coerce").notna()]
        if "predicted_wall_saving" in frame
        else frame.iloc[0:0]
    )
    if rows.empty:
        return []

    def pct(v: Any) -> str:
        return "n/a" if v is None or pd.isna(v) else f"{100 * float(v):5.1f}%"

    out = [
        f"{'run':<20} {'wall: predicted':>15} {'measured':>9} {'diff':>10} {'within run':>10} {'diff':>10}   "
        f"{'CPU: predicted':>14} {'measured':>9} {'diff':>10}   {'FLOPs: predicted':>16} {'measured':>9}   "
        "predicted from"
    ]
    for _, r in rows.iterrows():
        label = (names or {}).get(r["run_id"]) or r.get("name") or str(r["run_id"])[:8]
        diff = _pts(r.get("wall_saving"), r["predicted_wall_saving"])
        cpu_diff = _pts(r.get("cpu_saving"), r.get("predicted_cpu_saving"))
        within = r.get("wall_saving_within_run")
        out.append(
            f"{str(label)[:20]:<20} {pct(r['predicted_wall_saving']):>15} {pct(r.get('wall_saving')):>9} "
            f"{diff:>10} {pct(within):>10} {_pts(within, r['predicted_wall_saving']):>10}   "
            f"{pct(r.get('predicted_cpu_saving')):>14} {pct(r.get('cpu_saving')):>9} "
            f"{cpu_diff:>10}   "
            f"{pct(r.get('predicted_flop_saving')):>16} {pct(r.get('flop_saving')):>9}   {r['predicted_from']}"
        )
    return out


def run_row(run: RunData, include_block_evals: bool = False, last: int = FINAL_LAST) -> dict[str, Any]:
    """One :func:`summarize_run` row of a run read with ``COMPARE_PARTS``, with the run's ``seed``
    (``train.seed``) and its :func:`predicted_savings`."""
    record = run.record
    meta = {
        "run_id": record.run_id,
        "name": record.name,
        "method": record.method,
        "dataset": record.dataset,
        "status": record.status,
        "steps": record.param_int("train.steps"),
    }
    evals = eval_metrics(record.metrics, include_block_evals)
    return {
        "seed": record.param_int("train.seed"),
        **summarize_run(meta, run.history, run.layers, evals, last),
        **predicted_savings(run),
    }


# ----------------------------------------------------------------------------- groups of seeds


def stat_columns(frame: pd.DataFrame) -> list[str]:
    """The columns summarised per group: ``STAT_COLUMNS`` then the ``eval/*`` ones present."""
    evals = sorted(c for c in frame.columns if c.startswith(schema.EVAL))
    return [c for c in STAT_COLUMNS if c in frame.columns] + evals


@dataclass(frozen=True)
class GroupComparison:
    """Groups of seeds compared against a baseline group.

    ``runs``: one row per run (``comparison_frame`` with ``group`` and ``seed``; savings
    against the baseline group's mean). ``summary``: tidy ``group, metric, mean, sd, n``.
    ``paired``: :func:`analysis.stats.paired_against` of every other group against the baseline.
    """

    runs: pd.DataFrame
    summary: pd.DataFrame
    paired: pd.DataFrame
    baseline: str
    groups: list[str]
    specs: list[GroupSpec] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"baseline", "interval", "groups", "paired", "runs"}``."""
        from analysis.stats import INTERVAL_NAME

        kinds = {s.name: s for s in self.specs}
        groups = []
        for name in self.groups:
            part = self.runs[self.runs["group"] == name]
            methods = sorted(set(part["method"].dropna()))
            stats = self.summary[self.summary["group"] == name]
            spec = kinds.get(name)
            groups.append(
                {
                    "group": name,
                    "kind": spec.kind if spec else "group",
                    "n_runs": len(part),
                    "method": methods[0] if len(methods) == 1 else ("mixed" if methods else None),
                    "run_ids": list(part["run_id"]),
                    "seeds": list(part["seed"]),
                    "skipped_unfinished": list(spec.skipped) if spec else [],
                    "metrics": {
                        m: {"mean": mu, "sd": sd, "n": int(n)}
                        for m, mu, sd, n in zip(stats["metric"], stats["mean"], stats["sd"], stats["n"], strict=True)
                    },
                }
            )
        return {
            "baseline": self.baseline,
            "interval": INTERVAL_NAME,
            "groups": groups,
            "paired": self.paired.to_dict(orient="records"),
            "runs": self.runs.to_dict(orient="records"),
        }


def group_comparison(
    rows: pd.DataFrame | Sequence[dict[str, Any]], baseline: str | None = None, specs: Sequence[GroupSpec] = ()
) -> GroupComparison:
    """Pure part of :func:`compare_groups`: run rows carrying ``group`` and ``seed`` -> the comparison.

    ``baseline`` defaults to the first group; savings, paired differences and verdicts are
    measured against it.
    """
    from analysis.stats import group_summary, paired_against

    records = rows.to_dict(orient="records") if isinstance(rows, pd.DataFrame) else list(rows)
    groups = list(dict.fromkeys(r["group"] for r in records))
    if not groups:
        raise LayerLockError("nothing to compare: no runs")
    baseline = groups[0] if baseline is None else baseline
    if baseline not in groups:
        raise LayerLockError(f"--baseline {baseline} is not one of the compared groups ({', '.join(groups)})")
    runs = comparison_frame(records, baseline=baseline, by="group")
    # Metrics no compared run logged (e.g. probes never run) would only fill the tables with n/a.
    metrics = [m for m in stat_columns(runs) if pd.to_numeric(runs[m], errors="coerce").notna().any()]
    summary = group_summary(runs, metrics, by="group")
    paired = paired_against(
        runs, [m for m in metrics if m not in UNPAIRED], baseline, groups, pair_on="seed", by="group"
    )
    return GroupComparison(runs, summary, paired, baseline, groups, list(specs))


def compare_groups(
    specs: Sequence[GroupSpec],
    runs: Mapping[str, RunData],
    baseline: str | None = None,
    include_block_evals: bool = False,
    last: int = FINAL_LAST,
) -> GroupComparison:
    """Groups of seeds (or single runs; ``analysis.io.resolve_groups``) compared against
    ``baseline`` (a group's name; default the first). ``runs``: run id -> the run read with
    ``COMPARE_PARTS``, for every run of the groups."""
    if baseline is not None and baseline not in {s.name for s in specs}:
        raise LayerLockError(
            f"--baseline {baseline} is not one of the compared groups ({', '.join(s.name for s in specs)})"
        )
    rows = [
        {"group": spec.name, **run_row(runs[run_id], include_block_evals, last)}
        for spec in specs
        for run_id in spec.run_ids
    ]
    return group_comparison(rows, baseline, specs)


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
    loss: str = "final loss"  # how the final losses were measured (see final_losses)
    reference: str = "baseline"  # what each cell is scored against (the baseline run, or its seed group's mean)
    variant: str = schema.VARIANT_PREFIX  # the freeze-test variant (rows: L, i, or 0 for the stem)

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
                cells.append(
                    {
                        "blocks": int(blocks),
                        "step": int(step),
                        "ratio": None if pd.isna(r) else float(r),
                        "converged": None if pd.isna(ok) else bool(ok),
                    }
                )
        return {
            "baseline_final_loss": self.baseline_final_loss,
            "tol": self.tol,
            "loss": self.loss,
            "reference": self.reference,
            "variant": self.variant,
            "cells": cells,
            "max_converged_prefix": {str(k): int(v) for k, v in self.max_converged_prefix().items()},
        }


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
    ratio = (
        tested.pivot_table(index="freeze_blocks", columns="freeze_step", values="ratio", aggfunc="mean", dropna=False)
        .sort_index()
        .sort_index(axis=1)
    )
    # Verdict: NA where untested, False where tested without a usable loss.
    present = tested.groupby(["freeze_blocks", "freeze_step"]).size().unstack("freeze_step")
    present = present.reindex(index=ratio.index, columns=ratio.columns)
    converged = (ratio <= 1.0 + tol).astype("boolean").where(present.notna(), pd.NA)
    return FreezeGrid(
        ratio=ratio.astype(float), converged=converged, baseline_final_loss=float(baseline_final_loss), tol=float(tol)
    )


def final_losses(runs: Iterable[RunData], last: int = FINAL_LAST) -> tuple[dict[str, float], str]:
    """The final loss of each run (read with ``FINAL_LOSS_PARTS``), measured the same way for
    all: ``(losses, how)``, losses by run id.

    The held-out ``val/loss_pixel`` (fixed val clips and masks, logged at the end) when every
    run has it; otherwise the mean of the last ``last`` logged ``train/loss`` values, which
    also carries the minibatch noise of the run's last batches. ``how`` names the one used.
    """
    histories = {run.run_id: run.history for run in runs}
    if histories and all((h["metric"] == HELDOUT_KEY).any() for h in histories.values()):
        return (
            {r: last_value(h, HELDOUT_KEY) for r, h in histories.items()},
            f"{HELDOUT_KEY} (held-out clips, fixed masks)",
        )
    return (
        {r: final_value(h, schema.LOSS, last) for r, h in histories.items()},
        f"mean of the last {last} logged train/loss",
    )


def freeze_test_grid(
    runs: FreezeTestRuns,
    tol: float = 0.02,
    last: int = FINAL_LAST,
    variant: str = schema.VARIANT_PREFIX,
    reference: tuple[float, str] | None = None,
) -> FreezeGrid:
    """The grid of a freeze test read with ``FINAL_LOSS_PARTS``; final losses from :func:`final_losses`.

    ``variant``: only the children of that freeze-test variant (untagged ones are ``prefix``).
    ``reference``: ``(loss, name)`` each cell is scored against (default: the baseline's own final loss)."""
    parent_id = runs.baseline.run_id
    if not runs.children:
        raise LayerLockError(
            f"run {parent_id} has no freeze-test children (no runs tagged {schema.TAG_PARENT}={parent_id})"
        )
    children = children_frame([child.record for child in runs.children])
    children = children[children["freeze_variant"] == variant].reset_index(drop=True)
    if children.empty:
        raise LayerLockError(f"run {parent_id} has no freeze-test children of variant {variant}")
    kept = set(children["run_id"])
    losses, how = final_losses([runs.baseline, *(c for c in runs.children if c.run_id in kept)], last)
    baseline = losses[parent_id]
    if not np.isfinite(baseline):
        raise LayerLockError(f"run {parent_id} has no train/loss to serve as the freeze-test baseline")
    children["final_loss"] = [losses[rid] for rid in children["run_id"]]
    ref, name = reference if reference is not None else (baseline, "baseline")
    grid = freeze_grid_from_frames(children, ref, tol)
    grid = replace(grid, loss=how, reference=name, variant=variant)
    if grid.ratio.empty:
        raise LayerLockError(
            f"run {parent_id}: no child carries both {schema.TAG_FREEZE_STEP} and {schema.TAG_FREEZE_BLOCKS}"
        )
    return grid
