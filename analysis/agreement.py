"""The freeze test as ground truth: a calibrated tolerance, and how well the cheap rules agree.

The freeze test (:mod:`analysis.compare`, ``FreezeGrid``) freezes blocks 0..L-1 of a baseline
at step T and trains to the end; blocks 0..L-1 "had converged" by T when the child's final
loss stays within ``1 + tol`` of the baseline's. This module decides ``tol`` and scores the
cheap convergence rules of :mod:`analysis.convergence` against the grid.

Tolerance and reference (:func:`calibrated_tolerance`). When the baseline has a seed group
(runs sharing its ``layerlock.group`` tag: same config, other ``train.seed``; FINISHED ones
only, at least 2), each cell is scored against the group's mean final loss ``m``, not against
the one baseline run whose own luck every cell would share, with the tolerance of a new draw
from that group: ``tol = s * sqrt(1 + 1/N) / m`` (``s``: sample sd, ``ddof=1``, of the N
seeds' final losses; the ``1/N`` is the uncertainty of the mean itself). A child passes when
``child <= (1 + tol) * m``: one-sided, a child that ends lower always passes. Without a group
of two or more, cells are scored against the single baseline run, with an explicit ``tol`` or
``DEFAULT_TOL``, and the tolerance says it is not calibrated; an explicit ``tol`` with a group
keeps the group mean as the reference. ``final_loss`` is :func:`analysis.compare.final_losses`,
as for the grid itself: the held-out ``val/loss_pixel`` (fixed clips and masks) when every run
logged it, else the mean of the last 3 logged ``train/loss`` (noisier: about 4% relative sd
over seeds on mae_tiny against about 0.5% for the held-out loss, so a tolerance calibrated on
it passes nearly everything). :func:`tolerance_from_final_losses` keeps the older
``sd / mean`` (no ``sqrt(1 + 1/N)``) for callers that compare with one run.

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
    """The freeze test's tolerance, the loss each cell is scored against, and where both came from.

    ``source``: ``calibrated`` (seed spread of the group), ``explicit`` (given) or ``default``
    (``DEFAULT_TOL``, no usable group). ``runs``/``final_losses``: the group runs read (empty
    without a usable group). ``note``: why it is not calibrated (None when it is).
    ``reference``: ``group mean`` (the mean final loss of ``runs``) or ``baseline`` (the single
    run); ``reference_loss``: that loss (None: the baseline's own, read with the grid).
    ``new_draw``: the tolerance is ``sd * sqrt(1 + 1/N) / mean`` (a new draw from the group).
    """

    tol: float
    source: str
    group: str | None = None
    runs: tuple[str, ...] = ()
    final_losses: tuple[float, ...] = ()
    note: str | None = None
    loss: str = "final loss"  # how each run's final loss was measured (analysis.compare.final_losses)
    reference: str = "baseline"
    reference_loss: float | None = None
    new_draw: bool = False

    @property
    def calibrated(self) -> bool:
        return self.source == "calibrated"

    def against(self) -> str:
        if self.reference == GROUP_MEAN and self.reference_loss is not None:
            return (
                f"cells scored against the mean final loss {self.reference_loss:.4g} of {len(self.runs)} seeds "
                f"of group {self.group}"
            )
        return "cells scored against the single baseline run"

    def line(self) -> str:
        """One line saying how the tolerance was obtained and what the cells are scored against
        (what every command prints)."""
        head = f"tolerance {_pct(self.tol)}"
        if self.source == "calibrated":
            how = "sd x sqrt(1 + 1/N) / mean (a new draw)" if self.new_draw else "relative sd"
            return (
                f"{head} = {how} of final loss over {len(self.runs)} seeds of group {self.group} "
                f"(runs {', '.join(_short(r) for r in self.runs)}); {self.against()}; final loss = {self.loss}"
            )
        if self.source == "explicit":
            return f"{head} = given explicitly (--tol); {self.against()}" + (f"; {self.note}" if self.note else "")
        return f"{head} = default, {self.note or 'not calibrated'}; {self.against()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "runs": list(self.runs),
            "final_losses": list(self.final_losses),
            "calibrated": self.calibrated,
            "line": self.line(),
        }


GROUP_MEAN, BASELINE = "group mean", "baseline"


def tolerance_from_final_losses(
    final_losses: Mapping[str, float], group: str | None = None, new_draw: bool = False
) -> Tolerance:
    """``sd / mean`` of the finite final losses (sample sd, ``ddof=1``); needs at least 2.
    With ``new_draw``: ``sd * sqrt(1 + 1/N) / mean``, the spread of a new draw around the mean of
    N, scored against that mean (``reference`` = group mean).

    ``final_losses``: run id -> final loss of the runs of one seed group.
    """
    usable = {r: float(v) for r, v in final_losses.items() if v is not None and math.isfinite(float(v))}
    if len(usable) < 2:
        raise LayerLockError(f"calibrating the tolerance needs the final loss of >= 2 seeds, got {len(usable)}")
    values = np.array(list(usable.values()))
    mean = float(values.mean())
    if mean <= 0:
        raise LayerLockError(f"calibrating the tolerance needs positive final losses, mean is {mean:g}")
    factor = math.sqrt(1.0 + 1.0 / len(values)) if new_draw else 1.0
    return Tolerance(
        tol=float(values.std(ddof=1)) * factor / mean,
        source="calibrated",
        group=group,
        runs=tuple(usable),
        final_losses=tuple(usable.values()),
        reference=GROUP_MEAN if new_draw else BASELINE,
        reference_loss=mean if new_draw else None,
        new_draw=new_draw,
    )


def _fallback(tol: float | None, note: str, group: str | None = None) -> Tolerance:
    if tol is not None:
        return Tolerance(tol=float(tol), source="explicit", group=group)
    return Tolerance(tol=DEFAULT_TOL, source="default", group=group, note=note)


def _group_losses(runs: FreezeTestRuns, last: int) -> tuple[dict[str, float], str]:
    members = [
        r
        for r in runs.seed_group
        if r.record.status == "FINISHED"
        and schema.TAG_PARENT not in r.record.tags
        and r.record.method != schema.METHOD_FREEZE_TEST
    ]
    ordered = sorted(members, key=lambda r: r.record.start_time or pd.Timestamp(0, tz="UTC"))
    losses, how = final_losses(ordered, last)
    return {r: v for r, v in losses.items() if math.isfinite(v)}, how


def calibrated_tolerance(runs: FreezeTestRuns, tol: float | None = None, last: int = FINAL_LAST) -> Tolerance:
    """The tolerance and reference for the freeze test ``runs`` (read with ``FINAL_LOSS_PARTS``):
    with a seed group, its mean and ``sd * sqrt(1 + 1/N) / mean`` (or ``tol`` when given); else the
    single baseline and ``tol`` or ``DEFAULT_TOL`` (module docstring)."""
    if tol is not None and (not math.isfinite(tol) or tol < 0):
        raise LayerLockError(f"--tol must be a non-negative number, got {tol}")
    baseline_id = runs.baseline.run_id
    group = runs.baseline.record.tags.get(schema.TAG_GROUP)
    if not group:
        return _fallback(
            tol,
            f"not calibrated: no seed group of the baseline (run {_short(baseline_id)} has no {schema.TAG_GROUP} tag)",
        )
    losses, how = _group_losses(runs, last)
    if len(losses) < 2:
        return _fallback(
            tol,
            f"not calibrated: no seed group of the baseline (group {group} has {len(losses)} "
            "finished run(s) with a train/loss; train more seeds, e.g. pretrain --seeds 0,1,2)",
            group,
        )
    calibrated = replace(tolerance_from_final_losses(losses, group, new_draw=True), loss=how)
    if tol is not None:
        return replace(calibrated, tol=float(tol), source="explicit")
    return calibrated


def freeze_grid(
    runs: FreezeTestRuns, tol: float | None = None, last: int = FINAL_LAST, variant: str = schema.VARIANT_PREFIX
) -> tuple[FreezeGrid, Tolerance]:
    """:func:`analysis.compare.freeze_test_grid` of ``variant`` at the calibrated (or given)
    tolerance, scored against the group mean when there is a seed group."""
    tolerance = calibrated_tolerance(runs, tol, last)
    reference = None
    if tolerance.reference == GROUP_MEAN and tolerance.reference_loss is not None:
        reference = (tolerance.reference_loss, f"mean of {len(tolerance.runs)} seeds")
    return freeze_test_grid(runs, tol=tolerance.tol, last=last, variant=variant, reference=reference), tolerance


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


def freeze_test_ties(grid: FreezeGrid, truth: pd.DataFrame) -> list[dict[str, Any]]:
    """The blocks the freeze test cannot order: groups of two or more determined blocks with the
    same freeze-test step (or all ``never``), largest first. Each: ``step`` (None: never),
    ``status``, ``blocks``, ``prefixes`` (the rows L used) and ``passed_at``/``failed_at`` (the
    tested T at which those rows pass / fail), so a report can say *which* blocks tie and *at which
    steps* instead of only that the rank agreement is undefined."""
    determined = truth[truth["status"] != UNDETERMINED]
    out = []
    keys = determined["step"].astype("Float64").fillna(-1.0)
    for key, part in determined.groupby(keys, sort=True):
        if len(part) < 2:
            continue
        prefixes = sorted({int(p) for p in part["prefix"].dropna()})
        cells = grid.converged.loc[prefixes]
        passed = sorted({int(t) for t in cells.columns if cells[t].dropna().astype(bool).any()})
        failed = sorted({int(t) for t in cells.columns if (~cells[t].dropna().astype(bool)).any()})
        out.append(
            {
                "step": None if key < 0 else int(key),
                "status": str(part["status"].iloc[0]),
                "blocks": [int(b) for b in part["block"]],
                "prefixes": prefixes,
                "passed_at": passed,
                "failed_at": failed,
            }
        )
    return sorted(out, key=lambda t: -len(t["blocks"]))


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, run = [], []
    for v in sorted(values):
        if run and v == run[-1] + 1:
            run.append(v)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [v]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def ties_lines(ties: Sequence[Mapping[str, Any]]) -> list[str]:
    """Readable lines for :func:`freeze_test_ties` (empty when nothing ties)."""
    lines = []
    for t in ties:
        when = f"converged from T={t['step']}" if t["step"] is not None else "never converged (fail at the last T)"
        at = []
        if t["passed_at"]:
            at.append(f"pass at T={', '.join(map(str, t['passed_at']))}")
        if t["failed_at"]:
            at.append(f"fail at T={', '.join(map(str, t['failed_at']))}")
        lines.append(
            f"freeze test ties blocks {_ranges(t['blocks'])}: all {when}; rows L={', '.join(map(str, t['prefixes']))} "
            f"{'; '.join(at)}"
        )
    return lines


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
        "ties": freeze_test_ties(grid, truth),
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
        f"run {report['run_id']}: reference final loss {report['baseline_final_loss']:.4f}; tested T "
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
    ties = ties_lines(report.get("ties") or [])
    if ties:
        undefined = all(r["spearman_rho"] is None for r in report["rules"].values() if r["available"])
        lines += ["", *ties]
        if undefined:
            lines.append(
                "rank agreement undefined: the freeze test puts these blocks at one step, so it orders no pair of "
                "them (try the variants: freeze-test --variant stem|prefix-no-stem|block)"
            )
    lines += [
        "",
        "freeze-test: the first tested T from which freezing blocks 0..L-1 (L used: the shortest tested",
        "L > block) passes at that and every later tested T; never: fails at the last tested T; n/d: the",
        "block is deeper than the largest tested L. Ranks put 'never' after the end (blocks: how many",
        "were ranked); the step error is over blocks where both steps are numbers.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- variants over seeds

VARIANT_LABELS = {
    schema.VARIANT_PREFIX: "L={x} (with stem)",
    schema.VARIANT_PREFIX_NO_STEM: "L={x} no-stem",
    schema.VARIANT_BLOCK: "block {x}",
    schema.VARIANT_STEM: "stem",
}


def variant_costs(tests: Sequence[FreezeTestRuns], last: int = FINAL_LAST) -> pd.DataFrame:
    """The cost of every freeze-test cell over the seeds of its baselines, one row per
    (variant, x, T): ``cost`` = mean over seeds of ``child / own baseline - 1`` (paired: each
    seed's children against the baseline they branched off, so the baselines' luck cancels),
    ``low``/``high`` its Student-t 95% interval over the seeds (NaN with one seed), ``n`` seeds,
    ``seeds`` the per-seed costs. ``tests``: one freeze test per baseline (seed), read with
    ``FINAL_LOSS_PARTS``."""
    from analysis.records import children_frame
    from analysis.stats import t_interval

    rows: list[dict[str, Any]] = []
    for runs in tests:
        if not runs.children:
            raise LayerLockError(f"run {runs.baseline.run_id} has no freeze-test children")
        frame = children_frame([c.record for c in runs.children])
        losses, how = final_losses([runs.baseline, *runs.children], last)
        base = losses[runs.baseline.run_id]
        if not math.isfinite(base) or base <= 0:
            raise LayerLockError(f"run {runs.baseline.run_id} has no final loss to serve as a baseline")
        for r in frame.dropna(subset=["freeze_step", "freeze_blocks"]).itertuples(index=False):
            loss = losses.get(r.run_id, float("nan"))
            rows.append(
                {
                    "variant": r.freeze_variant,
                    "x": int(r.freeze_blocks),
                    "T": int(r.freeze_step),
                    "baseline": runs.baseline.run_id,
                    "cost": loss / base - 1.0,
                    "loss": how,
                }
            )
    if not rows:
        raise LayerLockError("no freeze-test child carries a step and blocks tag")
    cells = pd.DataFrame(rows).dropna(subset=["cost"])
    out = []
    order = {v: i for i, v in enumerate(schema.FREEZE_VARIANTS)}
    for (variant, x, T), part in cells.groupby(["variant", "x", "T"], sort=False):
        per_seed = part.groupby("baseline")["cost"].mean()  # a repeated cell of one seed counts once
        interval = t_interval(per_seed.to_numpy())
        out.append(
            {
                "variant": variant,
                "x": int(x),
                "cell": VARIANT_LABELS.get(variant, variant + " {x}").format(x=x),
                "T": int(T),
                "n": int(len(per_seed)),
                "cost": float(per_seed.mean()),
                "low": float("nan") if interval is None else interval[0],
                "high": float("nan") if interval is None else interval[1],
                "seeds": [float(v) for v in per_seed],
                "loss": str(part["loss"].iloc[0]),
            }
        )
    frame = pd.DataFrame(out)
    frame["_o"] = frame["variant"].map(order).fillna(len(order))
    return frame.sort_values(["_o", "x", "T"]).drop(columns="_o").reset_index(drop=True)


def seed_noise(tests: Sequence[FreezeTestRuns], last: int = FINAL_LAST) -> tuple[float | None, int]:
    """Relative sd (``ddof=1``) of the baselines' final losses, and how many: the seed noise the
    costs are read against (None with fewer than two)."""
    losses = [final_losses([t.baseline], last)[0][t.baseline.run_id] for t in tests]
    values = np.array([v for v in losses if math.isfinite(v)])
    if len(values) < 2:
        return None, len(values)
    return float(values.std(ddof=1) / values.mean()), len(values)


def format_variant_costs(costs: pd.DataFrame, noise: tuple[float | None, int], savings: Mapping[str, str]) -> str:
    """The table ``python -m analysis freeze-test-report`` prints: each cell's cost with its 95%
    interval over seeds, the seed noise, and what each variant saves."""
    sd, n = noise
    lines = [
        "cost = child final loss / its own baseline's - 1, mean over seeds [95% t interval over seeds]; "
        f"final loss = {costs['loss'].iloc[0]}",
        f"seed noise: relative sd of the {n} baselines' final loss = " + ("n/a" if sd is None else _pct(sd)),
        "",
        f"{'variant':<16} {'cell':<18} {'T':>6} {'n':>3} {'cost':>8}  {'95% interval':<22} saving",
    ]
    for r in costs.itertuples(index=False):
        ci = "n/a (one seed)" if math.isnan(r.low) else f"[{100 * r.low:+.2f}%, {100 * r.high:+.2f}%]"
        saves = savings.get(r.variant, "")
        lines.append(f"{r.variant:<16} {r.cell:<18} {r.T:>6} {r.n:>3} {100 * r.cost:+7.2f}%  {ci:<22} {saves}")
    return "\n".join(lines)


# What each variant saves, in words (the counted per-step numbers: core.flops.variant_saving).
VARIANT_SAVINGS = {
    schema.VARIANT_PREFIX: "backward of the stem and blocks 0..L-1",
    schema.VARIANT_STEM: "the stem's weight gradient only",
    schema.VARIANT_PREFIX_NO_STEM: "none to speak of: a diagnostic (backward runs through the frozen blocks)",
    schema.VARIANT_BLOCK: "block i's weight gradients only (its input gradient still runs)",
}
