"""Predicted wall-clock saving of a schedule: from the run's measured step times when it has
``time_model.json`` (``core.timemodel``), else from its counted FLOPs, saying which.

Counted FLOPs predict counted FLOPs exactly but overstate the time saved: data, masking,
targets, losses and the decoder cost the same at every frozen-prefix length. The time model
measured that part; FLOPs alone assume it shrinks with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analysis.flops import is_estimate, predicted_saving, stage_segments
from core.errors import LayerLockError, first_line
from core.timemodel import predicted_time_saving, time_table

BASIS_TIME_MODEL = "time_model"  # measured step times
BASIS_FLOPS = "flops"  # assumed proportional to counted FLOPs


@dataclass(frozen=True)
class WallPrediction:
    """``saving``: predicted fraction of wall time saved (None: nothing to predict from);
    ``basis``: ``time_model``, ``flops`` or None; ``note``: one line saying what it rests on."""

    saving: float | None
    basis: str | None
    note: str


def predict_wall_saving(
    schedule: dict[str, Any],
    total_steps: int,
    flop_model: dict[str, Any] | None,
    time_model: dict[str, Any] | None,
    clock: str = "wall",
) -> WallPrediction:
    """The schedule's wall saving over ``total_steps`` against training with nothing frozen
    (``clock="cpu"``: its CPU-time saving, from the time model's CPU record).

    A time model that cannot be read (or lacks k=0) is not an error for the user: the
    prediction falls back to FLOPs and the note says why.
    """
    why = "the run has no time_model.json"
    if time_model is not None:
        try:
            table = time_table(time_model, flop_model, clock)
            saving = predicted_time_saving(stage_segments(schedule, total_steps), total_steps, table)
            return WallPrediction(saving, BASIS_TIME_MODEL, table.describe())
        except LayerLockError as err:
            why = f"its time_model.json is not usable ({first_line(err)})"
    if flop_model is None:
        return WallPrediction(None, None, f"nothing to predict from: {why} and no flop_model.json")
    counted = "estimated" if is_estimate(flop_model) else "counted"
    return WallPrediction(
        predicted_saving(schedule, flop_model, total_steps),
        BASIS_FLOPS,
        f"assumed proportional to {counted} FLOPs ({why}); "
        "`python -m experiments bench freezing` measures how far time follows FLOPs",
    )
