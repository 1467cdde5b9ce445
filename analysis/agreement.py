"""The freeze test as ground truth: a calibrated tolerance, and how well the cheap rules agree.

The freeze test (:mod:`analysis.compare`, ``FreezeGrid``) freezes blocks 0..L-1 of a baseline
at step T and trains to the end; blocks 0..L-1 "had converged" by T when the child's final
loss stays within ``1 + tol`` of the baseline's. This module decides ``tol`` and scores the
cheap convergence rules of :mod:`analysis.convergence` against the grid.

Tolerance (:func:`tolerance_from_final_losses`): ``tol = s / m`` where ``s`` is the sample
standard deviation (``ddof=1``) and ``m`` the mean of the final losses of the baseline's seed
group (runs sharing its ``layerlock.group`` tag: same config, other ``train.seed``; FINISHED
ones only, at least 2). A freeze whose effect on the final loss is smaller than what changing
the seed does to one run is not a difference worth calling "not converged". We deliberately
do not use ``sqrt(2) * s / m``, the spread of the difference of two *independent* runs: a
freeze-test child is not independent of its baseline -- it shares the seed, the data order,
the masks and the weights up to T -- so its loss differs from the baseline's by less than two
seeds differ, and the wider band would pass freezes that do move the loss. The test is
one-sided (``ratio <= 1 + tol``): a child that ends lower always passes. Without a group of
two or more, an explicit ``tol`` or ``DEFAULT_TOL`` is used and the tolerance says it is not
calibrated. ``final_loss`` is :func:`analysis.compare.final_losses`, as for the grid itself: the
held-out ``val/loss_pixel`` (fixed clips and masks) when every run logged it, else the mean of
the last 3 logged ``train/loss`` (noisier: about 4% relative sd over seeds on mae_tiny against
about 0.5% for the held-out loss, so a tolerance calibrated on it passes nearly everything).

Freeze-test convergence step of block b (:func:`freeze_test_steps`): the grid row used is
``L_b``, the shortest tested prefix with ``L_b >= b + 1`` (the tightest test that freezes b).
Over the T's at which that row was tested, in order, block b converged at the smallest T
from which every tested cell passes (that T and every later one). A row whose last tested
cell fails: ``never`` (converged, if at all, after the last tested T). Blocks deeper than the
largest tested L: ``undetermined``. The freeze-test step can only be a tested T, so the step
error of a rule includes the grid's spacing.

Agreement of a rule with the freeze test (:func:`rule_agreement`), over the blocks where the
freeze test is determined: Spearman's rho and Kendall's tau (tau-b) between the rule's steps
and the freeze-test steps, blocks that never converged ranking after the end (tied), as in
:func:`analysis.convergence.order_statistics`; None with fewer than two blocks or when either
side is constant. ``mean_abs_error``: mean ``|rule step - freeze-test step|`` over the blocks
where both are numbers (None when there is none).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from analysis.compare import FINAL_LAST, FINAL_LOSS_PARTS, FreezeGrid, final_losses, freeze_test_grid
from analysis.convergence import RULES, detect_convergence
from analysis.records import FreezeTestRuns
from core import schema
from core.errors import LayerLockError

DEFAULT_TOL = 0.02
# What the agreement report reads of a freeze test (analysis.io.load_freeze_test): every run's
# final loss, and the baseline's per-block metrics the rules read.
AGREEMENT_BASELINE_PARTS = replace(FINAL_LOSS_PARTS, layers=tuple(sorted({r["metric"] for r in RULES.values()})))
# Freeze-test status of a block.
CONVERGED, NEVER, UNDETERMINED = "converged", "never", "undetermined"


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def _short(run_id: str) -> str:
    return run_id[:8]


# ----------------------------------------------------------------------------- tolerance


@dataclass(frozen=True)
class Tolerance:
    """The freeze test's tolerance and where it came from.

    ``source``: ``calibrated`` (seed spread of the group), ``explicit`` (given) or ``default``
    (``DEFAULT_TOL``, no usable group). ``runs``/``final_losses``: the group runs read (empty
    unless calibrated). ``note``: why it is not calibrated (None when it is).
    """

    tol: float
    source: str
    group: str | None = None
    runs: tuple[str, ...] = ()
    final_losses: tuple[float, ...] = ()
    note: str | None = None
    loss: str = "final loss"  # how each run's final loss was measured (analysis.compare.final_losses)

    @property
    def calibrated(self) -> bool:
        return self.source == "calibrated"

    def line(self) -> str:
        """One line saying how the tolerance was obtained (what every command prints)."""
        head = f"tolerance {_pct(self.tol)}"
        if self.source == "calibrated":
            return (
                f"{head} = relative sd of final loss over {len(self.runs)} seeds of group {self.group} "
                f"(runs {', '.join(_short(r) for r in self.runs)}); final loss = {self.loss}"
            )
        if self.source == "explicit":
            return f"{head} = given explicitly (--tol)" + (f"; {self.note}" if self.note else "")
        return f"{head} = default, {self.note or 'not calibrated'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "runs": list(self.runs),
            "final_losses": list(self.final_losses),
            "calibrated": self.calibrated,
            "line": self.line(),
        }


def tolerance_from_final_losses(final_losses: Mapping[str, float], group: str | None = None) -> Tolerance:
    """``sd / mean`` of the finite final losses (sample sd, ``ddof=1``); needs at least 2.

    ``final_losses``: run id -> final loss of the runs of one seed group.
    """
    usable = {r: float(v) for r, v in final_losses.items() if v is not None and math.isfinite(float(v))}
    if len(usable) < 2:
        raise LayerLockError(f"calibrating the tolerance needs the final loss of >= 2 seeds, got {len(usable)}")
    values = np.array(list(usable.values()))
    mean = float(values.mean())
    if mean <= 0:
        raise LayerLockError(f"calibrating the tolerance needs positive final losses, mean is {mean:g}")
    return Tolerance(
        tol=float(values.std(ddof=1)) / mean,
        source="calibrated",
        group=group,
        runs=tuple(usable),
        final_losses=tuple(usable.values()),
    )


def _fallback(tol: float | None, note: str, group: str | None = None) -> Tolerance:
    if tol is not None:
        return Tolerance(tol=float(tol), source="explicit", group=group)
    return Tolerance(tol=DEFAULT_TOL, source="default", group=group, note=note)


def calibrated_tolerance(runs: FreezeTestRuns, tol: float | None = None, last: int = FINAL_LAST) -> Tolerance:
    """The tolerance for the freeze test ``runs`` (read with ``FINAL_LOSS_PARTS``): ``tol`` when
    given, else the relative seed spread of the baseline's group (module docstring), else ``DEFAULT_TOL``."""
    if tol is not None:
        if not math.isfinite(tol) or tol < 0:
            raise LayerLockError(f"--tol must be a non-negative number, got {tol}")
        return _fallback(tol, "")
    baseline_id = runs.baseline.run_id
    group = runs.baseline.record.tags.get(schema.TAG_GROUP)
    if not group:
        return _fallback(
            None,
            f"not calibrated: no seed group of the baseline (run {_short(baseline_id)} has no {schema.TAG_GROUP} tag)",
        )
    members = [
        r
        for r in runs.seed_group
        if r.record.status == "FINISHED"
        and schema.TAG_PARENT not in r.record.tags
        and r.record.method != schema.METHOD_FREEZE_TEST
    ]
    ordered = sorted(members, key=lambda r: r.record.start_time or pd.Timestamp(0, tz="UTC"))
    losses, how = final_losses(ordered, last)
    losses = {r: v for r, v in losses.items() if math.isfinite(v)}
    if len(losses) < 2:
        return _fallback(
            None,
            f"not calibrated: no seed group of the baseline (group {group} has {len(losses)} "
            "finished run(s) with a train/loss; train more seeds, e.g. pretrain --seeds 0,1,2)",
            group,
        )
    return replace(tolerance_from_final_losses(losses, group), loss=how)


def freeze_grid(runs: FreezeTestRuns, tol: float | None = None, last: int = FINAL_LAST) -> tuple[FreezeGrid, Tolerance]:
    """:func:`analysis.compare.freeze_test_grid` at the calibrated (or given) tolerance."""
    tolerance = calibrated_tolerance(runs, tol, last)
    return freeze_test_grid(runs, tol=tolerance.tol, last=last), tolerance


# ----------------------------------------------------------------------------- freeze-test steps


def freeze_test_steps(grid: FreezeGrid, n_blocks: int) -> pd.DataFrame:
    """Per block: ``block, prefix`` (the row ``L_b`` used, <NA> when none), ``step`` (the
    freeze-test convergence step, <NA> unless converged) and ``status`` (converged, never,
    undetermined). See the module docstring for the definition."""
    tested = sorted(int(b) for b in grid.converged.index if grid.converged.loc[b].notna().any())
    rows = []
    for block in range(n_blocks):
        prefix = next((L for L in tested if L >= block + 1), None)
        step, status = None, UNDETERMINED
        if prefix is not None:
            cells = grid.converged.loc[prefix].dropna().sort_index()
            status = NEVER
            for t, ok in zip(cells.index[::-1], cells.to_numpy()[::-1], strict=True):  # walk back from the end
                if not bool(ok):
                    break
                step, status = int(t), CONVERGED
        rows.append((block, prefix, step, status))
    out = pd.DataFrame(rows, columns=["block", "prefix", "step", "status"])
    out["prefix"] = out["prefix"].astype("Int64")
    out["step"] = out["step"].astype("Int64")
    return out


def _after_end(steps: pd.Series) -> pd.Series:
    """Steps as floats with <NA> (never) ranked after every number (max + 1, tied)."""
    values = pd.to_numeric(steps, errors="coerce").astype(float)
    end = values.max() + 1.0 if values.notna().any() else 0.0
    return values.fillna(end)


def rule_agreement(rule_steps: pd.Series, truth: pd.DataFrame) -> dict[str, Any]:
    """Rank agreement and step error of one rule with the freeze test.

    ``rule_steps``: block -> step (<NA>: never), as returned by ``detect_convergence``;
    ``truth``: :func:`freeze_test_steps`. Returns ``spearman_rho, kendall_tau, mean_abs_error,
    n_ranked`` (blocks where the freeze test is determined) and ``n_compared`` (blocks where
    both steps are numbers).
    """
    from scipy import stats  # imported where needed: most callers never rank

    determined = truth[truth["status"] != UNDETERMINED].set_index("block")
    rule = pd.Series(rule_steps).reindex(determined.index)
    out: dict[str, Any] = {
        "spearman_rho": None,
        "kendall_tau": None,
        "mean_abs_error": None,
        "n_ranked": int(len(determined)),
        "n_compared": 0,
    }
    both = rule.notna() & determined["step"].notna()
    if both.any():
        diff = rule[both].astype(float) - determined.loc[both, "step"].astype(float)
        out["mean_abs_error"] = float(diff.abs().mean())
        out["n_compared"] = int(both.sum())
    if len(determined) < 2:
        return out
    x, y = _after_end(rule).to_numpy(), _after_end(determined["step"]).to_numpy()
    if len(np.unique(x)) < 2 or len(np.unique(y)) < 2:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(stats.spearmanr(x, y).statistic)
        tau = float(stats.kendalltau(x, y).statistic)
    out["spearman_rho"] = None if math.isnan(rho) else rho
    out["kendall_tau"] = None if math.isnan(tau) else tau
    return out


def rule_steps(layer_df: pd.DataFrame, rules: Sequence[str] = tuple(RULES)) -> dict[str, pd.Series | str]:
    """Each rule's convergence steps at its default thresholds; a rule whose metric the run
    lacks maps to the reason (a string) instead."""
    out: dict[str, pd.Series | str] = {}
    for name in rules:
        try:
            out[name] = detect_convergence(layer_df, name)
        except LayerLockError as err:
            out[name] = str(err)
    return out


def agreement_from_frames(
    grid: FreezeGrid, steps_by_rule: Mapping[str, pd.Series | str], n_blocks: int
) -> dict[str, Any]:
    """Pure part of :func:`agreement_report`: per-block table and per-rule agreement."""
    truth = freeze_test_steps(grid, n_blocks)
    blocks = []
    for row in truth.itertuples(index=False):
        entry: dict[str, Any] = {
            "block": int(row.block),
            "prefix": None if pd.isna(row.prefix) else int(row.prefix),
            "freeze_test_step": None if pd.isna(row.step) else int(row.step),
            "freeze_test": row.status,
        }
        for name, steps in steps_by_rule.items():
            value = steps.get(row.block, pd.NA) if isinstance(steps, pd.Series) else pd.NA
            entry[name] = None if pd.isna(value) else int(value)
        blocks.append(entry)
    rules: dict[str, Any] = {}
    for name, steps in steps_by_rule.items():
        info = {"metric": RULES[name]["metric"], "threshold": RULES[name]["threshold"]} if name in RULES else {}
        if isinstance(steps, str):
            rules[name] = {
                **info,
                "available": False,
                "note": steps,
                "spearman_rho": None,
                "kendall_tau": None,
                "mean_abs_error": None,
                "n_ranked": 0,
                "n_compared": 0,
            }
        else:
            rules[name] = {**info, "available": True, "note": None, **rule_agreement(steps, truth)}
    return {
        "tested_steps": [int(t) for t in grid.converged.columns],
        "tested_blocks": [int(b) for b in grid.converged.index],
        "blocks": blocks,
        "rules": rules,
    }


def agreement_report(runs: FreezeTestRuns, tol: float | None = None) -> dict[str, Any]:
    """Cheap rules of a baseline against its freeze test (``runs``: its children and seed group
    read with ``FINAL_LOSS_PARTS``, the baseline with ``AGREEMENT_BASELINE_PARTS``).

    Keys: ``run_id, tolerance`` (:meth:`Tolerance.to_dict`), ``baseline_final_loss``,
    ``n_blocks`` and those of :func:`agreement_from_frames`.
    """
    run_id = runs.baseline.run_id
    grid, tolerance = freeze_grid(runs, tol)
    layer_df = runs.baseline.layers
    depth = runs.baseline.record.param_int("model.depth")
    if depth is None:  # a run logged without its config: the deepest block seen anywhere
        known = [int(layer_df["block"].max()) + 1] if not layer_df.empty else []
        depth = max(known + [int(grid.converged.index.max()) + 1])
    steps = rule_steps(layer_df)  # a missing metric makes that rule "not available", not an error
    return {
        "run_id": run_id,
        "tolerance": tolerance.to_dict(),
        "baseline_final_loss": grid.baseline_final_loss,
        "n_blocks": int(depth),
        **agreement_from_frames(grid, steps, int(depth)),
    }


def rule_markers(report: Mapping[str, Any]) -> pd.DataFrame:
    """Where each rule puts the tested prefixes on the L x T grid: one row per (rule, tested L)
    whose block L-1 the rule saw converge: ``rule, blocks`` (L), ``block`` (L-1), ``step``."""
    by_block = {b["block"]: b for b in report["blocks"]}
    rows = []
    for name, info in report["rules"].items():
        if not info["available"]:
            continue
        for L in report["tested_blocks"]:
            step = by_block.get(L - 1, {}).get(name)
            if step is not None:
                rows.append((name, int(L), int(L) - 1, int(step)))
    return pd.DataFrame(rows, columns=["rule", "blocks", "block", "step"])


def format_report(report: Mapping[str, Any]) -> str:
    """The agreement report as a readable table (what ``python -m analysis agreement`` prints)."""
    names = list(report["rules"])

    def cell(v: Any, status: str | None = None) -> str:
        if status == UNDETERMINED:
            return "n/d"
        return "never" if v is None else str(v)

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = [
        report["tolerance"]["line"],
        f"run {report['run_id']}: baseline final loss {report['baseline_final_loss']:.4f}; tested T "
        f"{', '.join(map(str, report['tested_steps']))}; tested L {', '.join(map(str, report['tested_blocks']))}",
        "",
        f"{'block':>5}  {'L used':>6}  {'freeze-test':>11}  " + "  ".join(f"{n:>9}" for n in names),
    ]
    for b in report["blocks"]:
        lines.append(
            f"{b['block']:>5}  {cell(b['prefix'], b['freeze_test']):>6}  "
            f"{cell(b['freeze_test_step'], b['freeze_test']):>11}  " + "  ".join(f"{cell(b[n]):>9}" for n in names)
        )
    lines += [
        "",
        f"{'rule':<9}  {'metric':<10}  {'spearman':>8}  {'kendall':>8}  {'mean |step err|':>15}  {'blocks':>6}",
    ]
    for name, r in report["rules"].items():
        if not r["available"]:
            lines.append(f"{name:<9}  {r.get('metric', ''):<10}  not available: {r['note']}")
            continue
        lines.append(
            f"{name:<9}  {r['metric']:<10}  {num(r['spearman_rho'], '+.3f'):>8}  "
            f"{num(r['kendall_tau'], '+.3f'):>8}  {num(r['mean_abs_error'], '.1f'):>15}  "
            f"{r['n_ranked']:>6}"
        )
    lines += [
        "",
        "freeze-test: the first tested T from which freezing blocks 0..L-1 (L used: the shortest tested",
        "L > block) passes at that and every later tested T; never: fails at the last tested T; n/d: the",
        "block is deeper than the largest tested L. Ranks put 'never' after the end (blocks: how many",
        "were ranked); the step error is over blocks where both steps are numbers.",
    ]
    return "\n".join(lines)
