"""Freezing schedules and the one function that changes which prefix of blocks is frozen.

A schedule maps a training step to the length ``k`` of the frozen prefix (blocks 0..k-1, with
the patch embedding frozen together with block 0). Only a *prefix* saves backward compute:
gradients must still flow through any frozen block that sits below a trainable one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import FreezeConfig, LinearSchedule
from core.errors import ScheduleError


@dataclass(frozen=True)
class FreezeSchedule:
    """``stages``: ``(step, frozen)`` pairs; before the first stage nothing is frozen."""

    n_blocks: int
    stages: tuple[tuple[int, int], ...]
    source: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        validate_stages(self.n_blocks, self.stages)

    def frozen_at(self, step: int) -> int:
        k = 0
        for s, f in self.stages:
            if step >= s:
                k = f
        return k

    def check_within(self, total_steps: int) -> None:
        late = [s for s, _ in self.stages if s >= total_steps]
        if late:
            raise ScheduleError(f"schedule stage at step {late[0]} is outside the run (train.steps={total_steps})")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_blocks": self.n_blocks,
                               "stages": [{"step": s, "frozen": f} for s, f in self.stages]}
        out["source"] = self.source or {}
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "schedule") -> FreezeSchedule:
        if not isinstance(d, dict) or "n_blocks" not in d or "stages" not in d:
            raise ScheduleError(f"{where}: expected an object with 'n_blocks' and 'stages'")
        stages = d["stages"]
        if not isinstance(stages, list):
            raise ScheduleError(f"{where}: 'stages' must be a list")
        pairs = []
        for i, st in enumerate(stages):
            if not isinstance(st, dict) or set(st) - {"step", "frozen"} or {"step", "frozen"} - set(st):
                raise ScheduleError(f"{where}: stage {i} must have exactly the keys 'step' and 'frozen'")
            if not all(isinstance(st[k], int) and not isinstance(st[k], bool) for k in ("step", "frozen")):
                raise ScheduleError(f"{where}: stage {i} has a non-integer step or frozen")
            pairs.append((st["step"], st["frozen"]))
        n = d["n_blocks"]
        if not isinstance(n, int) or isinstance(n, bool):
            raise ScheduleError(f"{where}: 'n_blocks' must be an integer")
        try:
            return cls(n_blocks=n, stages=tuple(pairs), source=d.get("source"))
        except ScheduleError as err:
            raise ScheduleError(f"{where}: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> FreezeSchedule:
        p = Path(path)
        if not p.is_file():
            raise ScheduleError(f"schedule file not found: {p}")
        try:
            d = json.loads(p.read_text())
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


def validate_stages(n_blocks: int, stages: tuple[tuple[int, int], ...] | list) -> None:
    """Raise ScheduleError for the first violation of the schedule contract (DESIGN.md section 4)."""
    if n_blocks < 2:
        raise ScheduleError(f"n_blocks must be >= 2, got {n_blocks}")
    prev_step, prev_frozen = -1, 0
    for step, frozen in stages:
        if step < 0 or frozen < 0:
            raise ScheduleError(f"negative step or frozen count in stage (step={step}, frozen={frozen})")
        if step <= prev_step:
            raise ScheduleError(f"stage steps must strictly increase (step {step} after {prev_step})")
        if frozen < prev_frozen:
            raise ScheduleError(f"frozen counts must not decrease (frozen {frozen} after {prev_frozen} at step {step})")
        if frozen > n_blocks - 1:
            raise ScheduleError(f"at least one block must stay trainable: frozen={frozen} with n_blocks={n_blocks}")
        prev_step, prev_frozen = step, frozen


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
