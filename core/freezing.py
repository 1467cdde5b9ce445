"""Freezing schedules and the one function that changes which prefix of blocks is frozen.

A schedule maps a training step to the length ``k`` of the frozen prefix (blocks 0..k-1, with
the patch embedding frozen together with block 0). Only a *prefix* saves backward compute:
gradients must still flow through any frozen block that sits below a trainable one.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import FreezeConfig, LinearSchedule
from core.errors import ScheduleError, read_user_file


@dataclass(frozen=True)
class FreezeSchedule:
    """``stages``: ``(step, frozen)`` pairs; before the first stage nothing is frozen."""

    n_blocks: int
    stages: tuple[tuple[int, int], ...]
    source: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        validate_schedule(self.to_dict())

    def frozen_at(self, step: int) -> int:
        return frozen_at(self.stages, step)

    def check_within(self, total_steps: int) -> None:
        validate_schedule(self.to_dict(), total_steps=total_steps)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_blocks": self.n_blocks,
                               "stages": [{"step": s, "frozen": f} for s, f in self.stages]}
        out["source"] = self.source or {}
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "schedule") -> FreezeSchedule:
        try:
            d = validate_schedule(d)
        except ScheduleError as err:
            raise ScheduleError(f"{where}: {str(err).removeprefix('schedule: ')}") from None
        return cls(n_blocks=d["n_blocks"], stages=tuple((s["step"], s["frozen"]) for s in d["stages"]),
                   source=d["source"])

    @classmethod
    def load(cls, path: str | Path) -> FreezeSchedule:
        p = Path(path)
        text = read_user_file(p, "schedule", "a schedule is JSON text", ScheduleError)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ScheduleError(f"{p}: not valid JSON ({err.msg} at line {err.lineno})") from None
        return cls.from_dict(d, where=str(p))

    @classmethod
    def linear(cls, n_blocks: int, total_steps: int, spec: LinearSchedule) -> FreezeSchedule:
        """Freeze one more block at evenly spaced steps from ``start`` to ``end`` (fractions of the run)."""
        final = round(spec.final_frozen * n_blocks) if spec.final_frozen < 1 else int(spec.final_frozen)
        final = max(1, min(final, n_blocks - 1))
        if spec.end < spec.start:
            raise ScheduleError(f"linear schedule: end={spec.end} is before start={spec.start}")
        first, last = spec.start * total_steps, spec.end * total_steps
        steps = [round(first + (last - first) * i / max(final - 1, 1)) for i in range(final)]
        stages: dict[int, int] = {}
        for k, s in enumerate(steps, start=1):
            stages[min(s, total_steps - 1)] = k
        return cls(n_blocks=n_blocks, stages=tuple(sorted(stages.items())),
                   source={"kind": "linear", **spec.model_dump()})


def is_int(x: Any) -> bool:
    """A true integer (``numbers.Integral``), not a bool: the check every schedule field uses."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def frozen_at(stages: Iterable[tuple[int, int]], step: int) -> int:
    """Length of the frozen prefix at ``step`` for ``(step, frozen)`` stages sorted by step.

    The one definition of "which prefix is frozen at step t": a stage takes effect from its
    step on; before the first stage nothing is frozen.
    """
    k = 0
    for s, f in stages:
        if step >= s:
            k = f
    return k


def validate_schedule(
    d: Any,
    total_steps: int | None = None,
    n_blocks: int | None = None,
) -> dict[str, Any]:
    """Check a schedule and return a normalised copy (plain ints, ``source`` defaulting to {}).

    Raises ScheduleError with one clear message for the first violation found. ``total_steps``
    (when given) rejects stages at or after the end, which could never take effect;
    ``n_blocks`` (when given) must match the schedule's.
    """
    if not isinstance(d, dict):
        raise ScheduleError(f"schedule: expected a JSON object, got {type(d).__name__}")
    for key in ("n_blocks", "stages"):
        if key not in d:
            raise ScheduleError(f"schedule: missing key '{key}'")
    nb = d["n_blocks"]
    if not is_int(nb) or nb < 1:
        raise ScheduleError(f"schedule: n_blocks must be a positive integer, got {nb!r}")
    if n_blocks is not None and nb != n_blocks:
        raise ScheduleError(f"schedule: n_blocks={nb} does not match the model's {n_blocks} blocks")
    if not isinstance(d["stages"], list):
        raise ScheduleError(f"schedule: stages must be a list, got {type(d['stages']).__name__}")
    if "source" in d and not isinstance(d["source"], dict):
        raise ScheduleError("schedule: source must be an object")
    if total_steps is not None and (not is_int(total_steps) or total_steps < 1):
        raise ScheduleError(f"schedule: total_steps must be a positive integer, got {total_steps!r}")

    stages: list[dict[str, int]] = []
    for i, stage in enumerate(d["stages"]):
        where = f"schedule: stages[{i}]"
        if not isinstance(stage, dict):
            raise ScheduleError(f"{where} must be an object {{step, frozen}}, got {stage!r}")
        for key in ("step", "frozen"):
            if key not in stage:
                raise ScheduleError(f"{where} is missing '{key}'")
            if not is_int(stage[key]):
                raise ScheduleError(f"{where}.{key} must be an integer, got {stage[key]!r}")
            if stage[key] < 0:
                raise ScheduleError(f"{where}.{key}={stage[key]} is negative")
        extra = set(stage) - {"step", "frozen"}
        if extra:
            raise ScheduleError(f"{where} has unknown key(s) {', '.join(sorted(extra))}")
        step, frozen = int(stage["step"]), int(stage["frozen"])
        if frozen > nb - 1:
            raise ScheduleError(f"{where}.frozen={frozen} leaves no block trainable (n_blocks={nb}; at most {nb - 1})")
        if total_steps is not None and step >= total_steps:
            raise ScheduleError(f"{where}.step={step} is at or after the end of training (total_steps={total_steps})")
        if stages:
            prev = stages[-1]
            if step <= prev["step"]:
                raise ScheduleError(f"{where}.step={step} is not after stages[{i - 1}].step={prev['step']} "
                                    "(steps must strictly increase)")
            if frozen < prev["frozen"]:
                raise ScheduleError(f"{where}.frozen={frozen} is below stages[{i - 1}].frozen={prev['frozen']} "
                                    "(blocks cannot unfreeze)")
        stages.append({"step": step, "frozen": frozen})

    out = dict(d)
    out["n_blocks"] = int(nb)
    out["stages"] = stages
    out["source"] = dict(d.get("source") or {})
    return out


def schedule_from_config(cfg: FreezeConfig, n_blocks: int, total_steps: int) -> FreezeSchedule | None:
    """Build the run's schedule from ``freeze.schedule`` (path, inline stages or linear spec)."""
    spec = cfg.schedule
    if spec is None:
        return None
    if isinstance(spec, str):
        sched = FreezeSchedule.load(spec)
    elif isinstance(spec, LinearSchedule):
        sched = FreezeSchedule.linear(n_blocks, total_steps, spec)
    else:
        sched = FreezeSchedule(n_blocks=n_blocks, stages=tuple((s.step, s.frozen) for s in spec),
                               source={"kind": "inline"})
    if sched.n_blocks != n_blocks:
        raise ScheduleError(f"schedule is for n_blocks={sched.n_blocks} but model.depth={n_blocks}")
    sched.check_within(total_steps)
    return sched


def set_frozen_prefix(model: nn.Module, optimizer: torch.optim.Optimizer | None, k: int) -> None:
    """Freeze blocks 0..k-1 (and the patch embedding when k > 0); unfreeze the rest.

    The only place that touches ``requires_grad`` and optimizer state. Frozen parameters get
    ``requires_grad_(False)``, their ``.grad`` and their optimizer state (Adam moments) are
    dropped, so they cost neither backward compute nor memory; the model's forward runs the
    prefix under ``no_grad`` (``model.frozen_prefix``).
    """
    blocks = model.blocks
    if not 0 <= k < len(blocks):
        raise ScheduleError(f"cannot freeze {k} of {len(blocks)} blocks: at least one must train")
    frozen_params: list[nn.Parameter] = []
    for i, blk in enumerate(blocks):
        for p in blk.parameters():
            p.requires_grad_(i >= k)
            if i < k:
                frozen_params.append(p)
    for p in model.patch_embed.parameters():
        p.requires_grad_(k == 0)
        if k > 0:
            frozen_params.append(p)
    for p in frozen_params:
        p.grad = None
        if optimizer is not None:
            optimizer.state.pop(p, None)
    model.frozen_prefix = k


def freeze_all(model: nn.Module) -> None:
    """Fix every weight for inference-time gradients (attribution): ``requires_grad_(False)`` on
    all parameters, ``frozen_prefix`` left at 0 so that gradients still reach inputs and
    activations through every block."""
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
