"""Freezing schedules: validate, derive from detected convergence, evaluate.

A schedule (docs/architecture.md, "Run schema")::

    {"n_blocks": 8, "stages": [{"step": 300, "frozen": 1}, {"step": 500, "frozen": 3}], "source": {...}}

Conventions: ``frozen`` is the length of the frozen prefix (blocks ``0 .. frozen-1``); a stage
at step s applies to training step s and every later step until the next stage; before the
first stage nothing is frozen; steps are >= 0 and strictly increase; ``frozen`` never
decreases and stays <= ``n_blocks - 1`` so at least one block trains. Other top-level keys
(e.g. ``predicted_flop_saving``) are allowed and kept.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from analysis.flops import (
    baseline_flops,
    covers_stem,
    estimated_flop_model,
    is_estimate,
    predicted_saving,
    schedule_flops,
    stage_segments,
)
from analysis.records import Parts, RunData
from core.errors import LayerLockError, ScheduleError
from core.freezing import STEM_WITH_FIRST, is_int, validate_schedule  # noqa: F401  (one validator for trainer and analyzer)
from core.freezing import frozen_at as _frozen_at


def frozen_at(schedule: dict[str, Any], step: int) -> int:
    """Frozen-prefix length in force at training step ``step`` (``core.freezing.frozen_at``)."""
    return _frozen_at(((s["step"], s["frozen"]) for s in schedule["stages"]), step)


def frozen_curve(schedule: dict[str, Any], total_steps: int) -> np.ndarray:
    """``frozen_at`` for every step ``0 .. total_steps-1``: int64 array of shape (total_steps,)."""
    curve = np.zeros(max(total_steps, 0), dtype=np.int64)
    for start, stop, frozen in stage_segments(schedule, total_steps):
        curve[start:stop] = frozen
    return curve


def derive_schedule(
    conv: pd.Series,
    n_blocks: int,
    total_steps: int,
    margin: int = 0,
    max_frozen: int | None = None,
    quantize: int | None = None,
    source: dict[str, Any] | None = None,
    stem: str | None = None,
) -> dict[str, Any]:
    """Monotone-prefix schedule from per-block convergence steps.

    ``stem``: when the stem freezes (``core.freezing.STEM_POLICIES``; None: with block 0, the
    default, not written); written as the schedule's optional ``stem`` field.

    Prefix k (blocks ``0 .. k-1``) freezes at ``max(conv[0..k-1]) + margin`` steps, rounded
    UP to a multiple of ``quantize`` when given, so no block freezes before it (and every
    block below it) converged. Derivation stops at the first block that never converged
    (``<NA>``; a block absent from ``conv`` counts as never), at ``max_frozen`` (default and
    hard cap: ``n_blocks - 1``, one block always trains), and at the first stage that would
    fall at or after ``total_steps``. Stages landing on the same step merge into the largest
    prefix. ``margin`` is in steps.
    """
    if not is_int(n_blocks) or n_blocks < 1:
        raise ScheduleError(f"n_blocks must be a positive integer, got {n_blocks!r}")
    if not is_int(total_steps) or total_steps < 1:
        raise ScheduleError(f"total_steps must be a positive integer, got {total_steps!r}")
    if not is_int(margin) or margin < 0:
        raise ScheduleError(f"margin must be a non-negative integer number of steps, got {margin!r}")
    if quantize is not None and (not is_int(quantize) or quantize < 1):
        raise ScheduleError(f"quantize must be a positive integer, got {quantize!r}")
    if max_frozen is not None and (not is_int(max_frozen) or max_frozen < 0):
        raise ScheduleError(f"max_frozen must be a non-negative integer, got {max_frozen!r}")
    cap = n_blocks - 1 if max_frozen is None else min(int(max_frozen), n_blocks - 1)

    stages: list[dict[str, int]] = []
    ready = -1  # latest convergence step among blocks 0..k-1
    for k in range(1, cap + 1):
        step = conv.get(k - 1, pd.NA)
        if pd.isna(step):
            break  # a prefix can only grow through converged blocks
        ready = max(ready, int(step))
        at = ready + int(margin)
        if quantize:
            at = math.ceil(at / quantize) * quantize
        if at >= total_steps:
            break  # later prefixes are ready no earlier
        if stages and stages[-1]["step"] == at:
            stages[-1]["frozen"] = k  # same step: keep the largest prefix
        else:
            stages.append({"step": at, "frozen": k})

    meta = {
        "rule": "monotone_prefix",
        "margin": int(margin),
        "max_frozen": cap,
        "quantize": quantize,
        "total_steps": int(total_steps),
    }
    out: dict[str, Any] = {"n_blocks": int(n_blocks), "stages": stages, "source": {**meta, **(source or {})}}
    if stem is not None and stem != STEM_WITH_FIRST:
        out["stem"] = stem
    return validate_schedule(out, total_steps=total_steps)  # the default stem is not written: old files stay old


def schedule_with_prediction(
    schedule: dict[str, Any],
    flop_model: dict[str, Any] | None,
    total_steps: int,
    time_model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The schedule plus top-level predictions (what ``python -m analysis schedule`` writes).

    Adds ``predicted_flop_saving`` (``1 - flops / (total_steps * per_step[0])``),
    ``predicted_saving_basis``: ``"counted"`` (the run's ``flop_model.json``) or ``"estimate"``
    (:func:`analysis.flops.estimated_flop_model`, a uniform per-block cost; ``prediction.flop_model``
    says what it assumes), and ``predicted_time_saving`` with ``predicted_time_basis``: from the
    run's measured step times (``time_model.json``, basis ``time_model``) when it has them, else
    assumed proportional to the FLOPs (basis ``flops``). FLOP savings are None without a flop
    model. ``prediction`` holds the totals and one line saying what the time prediction rests on
    (:func:`analysis.timing.predict_wall_saving`).
    """
    from analysis.timing import predict_wall_saving

    out = validate_schedule(schedule)
    if flop_model is not None and not covers_stem(flop_model, out):
        # An older run's flop model counted only the stem frozen with block 0.
        flop_model = estimated_flop_model(int(out["n_blocks"]))
    wall = predict_wall_saving(out, int(total_steps), flop_model, time_model)
    prediction: dict[str, Any] = {"total_steps": int(total_steps)}
    flop_basis = None
    if flop_model is None:
        prediction["note"] = "run has no flop_model.json"
    else:
        flop_basis = "estimate" if is_estimate(flop_model) else "counted"
        prediction.update(
            flops=schedule_flops(out, flop_model, total_steps),
            baseline_flops=baseline_flops(flop_model, total_steps),
            flop_model=flop_model.get("basis") if flop_basis == "estimate" else "counted (the run's flop_model.json)",
            flop_model_objective=flop_model.get("objective"),
        )
    prediction["time_model"] = wall.note
    out.update(
        predicted_flop_saving=None if flop_model is None else predicted_saving(out, flop_model, total_steps),
        predicted_saving_basis=flop_basis,
        predicted_time_saving=wall.saving,
        predicted_time_basis=wall.basis,
        prediction=prediction,
    )
    return out


def schedule_for_run(
    run_id: str,
    conv: pd.Series,
    *,
    method: str,
    threshold: float | None = None,
    patience: int | None = None,
    total_steps: int | None,
    n_blocks: int | None,
    flop_model: dict[str, Any] | None,
    margin: int = 0,
    max_frozen: int | None = None,
    quantize: int | None = None,
    time_model: dict[str, Any] | None = None,
    stem: str | None = None,
) -> dict[str, Any]:
    """A run's derived schedule with its predicted saving: the one path from detected
    convergence to a schedule (the analysis CLI, the Schedule page, the demo and the study).

    ``conv`` holds the per-block convergence steps of rule ``method`` (``threshold`` and
    ``patience``: None = the rule's defaults, recorded in ``source``). Depth: ``n_blocks`` (the
    run's ``model.depth``), else the flop model's, else the blocks in ``conv``. Without a flop
    model the FLOP saving is predicted from :func:`analysis.flops.estimated_flop_model` and labelled
    ``"predicted_saving_basis": "estimate"``. ``time_model``: the run's ``time_model.json`` for the
    wall-clock prediction. Raises LayerLockError without ``total_steps``.
    """
    from analysis.convergence import RULES

    if not total_steps:
        raise LayerLockError(f"run {run_id} has no train.steps param; pass the total number of steps")
    depth = n_blocks or (flop_model or {}).get("n_blocks") or (int(conv.index.max()) + 1 if len(conv) else 0)
    if not depth:
        raise LayerLockError(f"run {run_id}: cannot tell its depth (no model.depth param, flop model or block metrics)")
    rule = RULES[method]
    source: dict[str, Any] = {
        "run_id": run_id,
        "method": method,
        "threshold": rule["threshold"] if threshold is None else threshold,
    }
    if rule["patience"] is not None or patience is not None:
        source["patience"] = rule["patience"] if patience is None else patience
    schedule = derive_schedule(
        conv,
        int(depth),
        int(total_steps),
        margin=margin,
        max_frozen=max_frozen,
        quantize=quantize,
        source=source,
        stem=stem,
    )
    if flop_model is None:
        flop_model = estimated_flop_model(int(depth))
    return schedule_with_prediction(schedule, flop_model, int(total_steps), time_model)


def schedule_parts(method: str = "posthoc") -> Parts:
    """What :func:`derive_run_schedule` reads of a run with rule ``method`` (for ``analysis.io.load_run``)."""
    from analysis.convergence import RULES

    if method not in RULES:
        raise LayerLockError(f"unknown convergence method '{method}' (choose from {', '.join(RULES)})")
    return Parts(layers=(RULES[method]["metric"],), flop_model=True, time_model=True)


def derive_run_schedule(
    run: RunData,
    method: str = "posthoc",
    threshold: float | None = None,
    patience: int | None = None,
    *,
    total_steps: int | None = None,
    margin: int = 0,
    max_frozen: int | None = None,
    quantize: int | None = None,
    stem: str | None = None,
) -> dict[str, Any]:
    """:func:`schedule_for_run` on a logged run, read with :func:`schedule_parts` (its layer
    metrics, FLOP and time models); ``total_steps`` defaults to its ``train.steps``."""
    from analysis.convergence import detect_convergence

    schedule_parts(method)  # an unknown method fails here, not as a missing part
    conv = detect_convergence(run.layers, method, threshold, patience)
    record = run.record
    return schedule_for_run(
        run.run_id,
        conv,
        method=method,
        threshold=threshold,
        patience=patience,
        total_steps=total_steps or record.param_int("train.steps"),
        n_blocks=record.param_int("model.depth"),
        flop_model=run.flop_model,
        margin=margin,
        max_frozen=max_frozen,
        quantize=quantize,
        time_model=run.time_model,
        stem=stem,
    )
