"""Counted compute of a training run under a freezing schedule.

The trainer logs ``flop_model.json``: the FLOPs of ONE training step as counted by
``torch.utils.flop_counter.FlopCounterMode`` for every frozen-prefix length k::

    {"n_blocks": 8, "batch_size": 32, "objective": "pixel",
     "per_step": {"0": 1.2e9, "1": 1.1e9, ..., "7": 0.4e9}}

A run of ``total_steps`` trains steps ``0 .. total_steps-1``; step t costs
``per_step[frozen_at(schedule, t)]``. The model is the source run's: a prediction made from an
MAE (pixel) run does not include the extra target forward that the LayerLock objective adds.

A run without ``flop_model.json`` (an older run, or a monitored loop without ``train_step``)
gets :func:`estimated_flop_model`: a uniform per-block cost from its logged depth, marked
``"estimate": true`` so that every prediction made from it says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.errors import LayerLockError
from core.freezing import STEM_WITH_FIRST, frozen_at, prefix_set

# What an estimated FLOP model assumes (shown with every prediction made from one).
ESTIMATE_BASIS = (
    "estimate (the run has no flop_model.json): every block costs the same, its backward twice "
    "its forward, and nothing outside the blocks is counted, so the saving is an upper bound"
)


def estimated_flop_model(n_blocks: int) -> dict[str, Any]:
    """A FLOP model from the depth alone: in units of one block's forward, a step costs ``3 n``
    (forward 1 + backward 2 per block) and freezing k blocks saves their backward, ``2 k``.
    Marked ``"estimate": True``; ``basis`` says what it assumes."""
    if not isinstance(n_blocks, int) or isinstance(n_blocks, bool) or n_blocks < 1:
        raise LayerLockError(f"cannot estimate a FLOP model for n_blocks={n_blocks!r}")
    return {
        "n_blocks": n_blocks,
        "per_step": {str(k): float(3 * n_blocks - 2 * k) for k in range(n_blocks)},
        "per_step_k": "k = blocks 0..k-1 frozen",
        # The stem trains (freeze.stem never/last): gradients run through the frozen blocks, which
        # save only their weight gradients, one forward's worth each.
        "per_step_stem_trains": {str(k): float(3 * n_blocks - k) for k in range(n_blocks)},
        "estimate": True,
        "basis": ESTIMATE_BASIS,
    }


def is_estimate(flop_model: dict[str, Any] | None) -> bool:
    """Whether a FLOP model is :func:`estimated_flop_model`'s rather than counted."""
    return bool(flop_model and flop_model.get("estimate"))


def per_step_flops(flop_model: dict[str, Any]) -> np.ndarray:
    """``per_step`` as an array indexed by k (keys may be ``"3"`` or ``3``); must be dense from 0."""
    if not isinstance(flop_model, dict) or not isinstance(flop_model.get("per_step"), dict):
        raise LayerLockError("flop model: expected a mapping with a 'per_step' mapping {k: flops}")
    try:
        table = {int(k): float(v) for k, v in flop_model["per_step"].items()}
    except (TypeError, ValueError):
        raise LayerLockError("flop model: 'per_step' keys must be integers k and values numbers") from None
    if not table:
        raise LayerLockError("flop model: 'per_step' is empty")
    missing = sorted(set(range(max(table) + 1)) - set(table))
    if missing:
        raise LayerLockError(f"flop model: 'per_step' has no entry for k={missing[0]}")
    flops = np.array([table[k] for k in range(len(table))], dtype=np.float64)
    if not np.all(np.isfinite(flops)) or np.any(flops < 0) or flops[0] <= 0:
        raise LayerLockError("flop model: per-step FLOPs must be finite, non-negative, and positive at k=0")
    return flops


def stage_segments(schedule: dict[str, Any], total_steps: int) -> list[tuple[int, int, int]]:
    """``[(start, stop, frozen), ...]`` covering steps ``0 .. total_steps-1`` (stop exclusive).

    Each segment's prefix is ``core.freezing.frozen_at`` at its start: stages only change
    the prefix at their own steps.
    """
    if total_steps <= 0:
        return []
    stages = [(int(s["step"]), int(s["frozen"])) for s in schedule.get("stages", [])]
    bounds = sorted({0, total_steps} | {s for s, _ in stages if 0 < s < total_steps})
    return [(a, b, frozen_at(stages, a)) for a, b in zip(bounds, bounds[1:]) if b > a]


def _stem_tables(flop_model: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(stage k with the stem frozen, stage k with the stem trainable) per-step tables of a flop
    model; None where it does not hold that table."""
    policy = flop_model.get("stem", STEM_WITH_FIRST)
    with_stem = per_step_flops(flop_model) if policy == STEM_WITH_FIRST else None
    trains = flop_model.get("per_step_stem_trains")
    if policy != STEM_WITH_FIRST and trains is None and policy == "never":
        trains = flop_model["per_step"]
    return with_stem, (per_step_flops({"per_step": trains}) if isinstance(trains, dict) else None)


def covers_stem(flop_model: dict[str, Any], schedule: dict[str, Any]) -> bool:
    """Whether ``flop_model`` holds the stage costs ``schedule``'s stem policy needs."""
    with_stem, trains = _stem_tables(flop_model)
    policy = schedule.get("stem", STEM_WITH_FIRST)
    return (with_stem is not None or policy == "never") and (trains is not None or policy == STEM_WITH_FIRST)


def schedule_flops(schedule: dict[str, Any], flop_model: dict[str, Any], total_steps: int) -> float:
    """Total counted FLOPs of ``total_steps`` training steps under ``schedule``. A stage whose stem
    trains (the schedule's ``stem``: never, or last before its last stage) costs
    ``per_step_stem_trains[k]``: its frozen blocks save only their weight gradients."""
    policy = schedule.get("stem", STEM_WITH_FIRST)
    with_stem, trains = _stem_tables(flop_model)
    last = max((int(s["frozen"]) for s in schedule.get("stages", [])), default=0)
    total = 0.0
    for start, stop, frozen in stage_segments(schedule, total_steps):
        stem_frozen = prefix_set(frozen, policy, last).stem or frozen == 0
        flops = with_stem if stem_frozen else trains
        if flops is None:
            raise LayerLockError(
                f"flop model has no per-step costs for stem {'frozen' if stem_frozen else 'trainable'} "
                f"(schedule stem: {policy})"
            )
        if frozen >= flops.size:
            raise LayerLockError(f"flop model has no entry for {frozen} frozen blocks (it covers k < {flops.size})")
        total += (stop - start) * flops[frozen]
    return total


def baseline_flops(flop_model: dict[str, Any], total_steps: int) -> float:
    """FLOPs of the same run with nothing frozen: ``total_steps * per_step[0]``."""
    return float(total_steps * per_step_flops(flop_model)[0])


def predicted_saving(schedule: dict[str, Any], flop_model: dict[str, Any], total_steps: int) -> float:
    """``1 - schedule_flops / (total_steps * per_step[0])``: the fraction of compute saved."""
    if total_steps <= 0:
        raise LayerLockError(f"total_steps must be positive, got {total_steps}")
    return 1.0 - schedule_flops(schedule, flop_model, total_steps) / baseline_flops(flop_model, total_steps)


def logged_saving(
    total_flops: float | None, total_steps: int | None, flop_model: dict[str, Any] | None
) -> float | None:
    """``1 - logged cumulative FLOPs / (total_steps * per_step[0])``: what a finished run saved
    against the same run with nothing frozen. None when any input is missing or the flop model
    is malformed (it hides this one number, nothing else)."""
    if total_flops is None or not total_steps or flop_model is None:
        return None
    try:
        full = baseline_flops(flop_model, total_steps)
    except LayerLockError:
        return None
    return 1.0 - float(total_flops) / full if full > 0 else None
