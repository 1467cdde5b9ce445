"""Freezing schedules and the one function that changes which prefix of blocks is frozen.

A schedule maps a training step to the length ``k`` of the frozen prefix (blocks 0..k-1, with
the patch embedding frozen together with block 0). Only a *prefix* saves backward compute:
gradients must still flow through any frozen block that sits below a trainable one.

Any model: :func:`freeze_prefix` works on a plain list of modules (the "blocks", in depth
order) plus a ``stem`` (modules or parameters that run before block 0 and freeze with it), and
:func:`apply_schedule` applies a schedule JSON to such a list at a step, in the caller's own
training loop. The trainer's :func:`set_frozen_prefix` is the same function on ``model.blocks``.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import FreezeConfig, LinearSchedule
from core.errors import ScheduleError, read_user_file

# When the stem freezes under a schedule (the schedule JSON's optional "stem" field).
from core.schema import STEM_LAST, STEM_NEVER, STEM_POLICIES, STEM_WITH_FIRST  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class FrozenSet:
    """What is frozen: ``blocks`` (indices, any subset) and the ``stem``. The one description the
    trainer, the FLOP count and the freeze-test variants share. Only the part of it that nothing
    trainable sits below -- the stem frozen and the leading run of frozen blocks 0..p-1
    (:attr:`no_grad_prefix`) -- runs without an autograd graph and saves its backward; every other
    frozen block only skips its weight gradients (its input gradient still flows to what is below)."""

    blocks: frozenset[int] = frozenset()
    stem: bool = False

    @property
    def prefix(self) -> int:
        """Length of the leading run 0..p-1 of frozen blocks."""
        p = 0
        while p in self.blocks:
            p += 1
        return p

    @property
    def no_grad_prefix(self) -> int:
        """Blocks that run under ``no_grad`` (no backward at all): the prefix, when the stem is frozen."""
        return self.prefix if self.stem else 0

    def describe(self) -> str:
        parts = ([f"blocks {','.join(map(str, sorted(self.blocks)))}"] if self.blocks else []) + (
            ["stem"] if self.stem else []
        )
        return " + ".join(parts) or "nothing"


def prefix_set(k: int, stem_policy: str = STEM_WITH_FIRST, last_frozen: int | None = None) -> FrozenSet:
    """Blocks 0..k-1 and the stem as ``stem_policy`` says: ``with_first`` frozen with block 0 (k > 0),
    ``last`` only from the schedule's last stage (``k == last_frozen > 0``), ``never`` never."""
    if stem_policy not in STEM_POLICIES:
        raise ScheduleError(f"stem must be one of {', '.join(STEM_POLICIES)}, got {stem_policy!r}")
    if stem_policy == STEM_WITH_FIRST:
        stem = k > 0
    elif stem_policy == STEM_LAST:
        stem = k > 0 and k == (k if last_frozen is None else last_frozen)
    else:
        stem = False
    return FrozenSet(frozenset(range(k)), stem)


@dataclass(frozen=True)
class FreezeSchedule:
    """``stages``: ``(step, frozen)`` pairs; before the first stage nothing is frozen."""

    n_blocks: int
    stages: tuple[tuple[int, int], ...]
    source: dict[str, Any] | None = None
    stem: str = STEM_WITH_FIRST  # when the stem freezes (STEM_POLICIES); optional in the JSON

    @property
    def last_frozen(self) -> int:
        """The deepest prefix the schedule reaches (0 without stages)."""
        return max((f for _, f in self.stages), default=0)

    def frozen_set_at(self, step: int) -> FrozenSet:
        """What is frozen at ``step``: the prefix, and the stem as ``stem`` says."""
        return prefix_set(self.frozen_at(step), self.stem, self.last_frozen)

    def __post_init__(self) -> None:
        validate_schedule(self.to_dict())

    def frozen_at(self, step: int) -> int:
        return frozen_at(self.stages, step)

    def check_within(self, total_steps: int) -> None:
        validate_schedule(self.to_dict(), total_steps=total_steps)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_blocks": self.n_blocks, "stages": [{"step": s, "frozen": f} for s, f in self.stages]}
        out["source"] = self.source or {}
        if self.stem != STEM_WITH_FIRST:  # written only when it differs: old readers see old files
            out["stem"] = self.stem
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "schedule") -> FreezeSchedule:
        try:
            d = validate_schedule(d)
        except ScheduleError as err:
            raise ScheduleError(f"{where}: {str(err).removeprefix('schedule: ')}") from None
        return cls(
            n_blocks=d["n_blocks"],
            stages=tuple((s["step"], s["frozen"]) for s in d["stages"]),
            source=d["source"],
            stem=d.get("stem", STEM_WITH_FIRST),
        )

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
        return cls(
            n_blocks=n_blocks, stages=tuple(sorted(stages.items())), source={"kind": "linear", **spec.model_dump()}
        )


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
    if d.get("stem", STEM_WITH_FIRST) not in STEM_POLICIES:
        raise ScheduleError(f"schedule: stem must be one of {', '.join(STEM_POLICIES)}, got {d['stem']!r}")
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
                raise ScheduleError(
                    f"{where}.step={step} is not after stages[{i - 1}].step={prev['step']} "
                    "(steps must strictly increase)"
                )
            if frozen < prev["frozen"]:
                raise ScheduleError(
                    f"{where}.frozen={frozen} is below stages[{i - 1}].frozen={prev['frozen']} (blocks cannot unfreeze)"
                )
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
        sched = FreezeSchedule(
            n_blocks=n_blocks, stages=tuple((s.step, s.frozen) for s in spec), source={"kind": "inline"}
        )
    if sched.n_blocks != n_blocks:
        raise ScheduleError(f"schedule is for n_blocks={sched.n_blocks} but model.depth={n_blocks}")
    if cfg.stem is not None:  # the config's freeze.stem overrides the schedule JSON's
        sched = dataclasses.replace(sched, stem=cfg.stem)
    sched.check_within(total_steps)
    return sched


def fixed_set_from_config(cfg: FreezeConfig, n_blocks: int) -> tuple[int, FrozenSet] | None:
    """``(step, set)`` of ``freeze.only`` (None without it); ScheduleError for a block outside the
    model or a set that leaves no block trainable."""
    if cfg.only is None:
        return None
    blocks = cfg.only.blocks
    bad = [b for b in blocks if not 0 <= b < n_blocks]
    if bad:
        raise ScheduleError(f"freeze.only.blocks: block {bad[0]} is outside 0..{n_blocks - 1} (model.depth={n_blocks})")
    if len(set(blocks)) >= n_blocks:
        raise ScheduleError(f"freeze.only.blocks freezes all {n_blocks} blocks: at least one must train")
    return cfg.only.step, FrozenSet(frozenset(blocks), cfg.only.stem)


# ----------------------------------------------------------------------------- any list of modules

# Attributes this module keeps on the objects it freezes (and removes when it unfreezes them):
_SAVED_FLAG = "_layerlock_requires_grad"  # on a parameter: its requires_grad before it was frozen
_NO_GRAD = "_layerlock_no_grad"  # on a frozen block: its two hook handles
_GRAD_MODES = "_layerlock_grad_modes"  # on a frozen block: grad modes to restore after its forward
_WARNED = "_layerlock_warned"  # on a frozen block: the stem warning was given


def _stem_parameters(stem: Iterable[nn.Module | nn.Parameter]) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for item in stem:
        if isinstance(item, nn.Parameter):
            out.append(item)
        elif isinstance(item, nn.Module):
            out.extend(item.parameters())
        else:
            raise ScheduleError(f"stem entries must be modules or parameters, got {type(item).__name__}")
    return out


def _enter_no_grad(block: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a frozen block: its forward builds no autograd graph."""
    if torch.is_grad_enabled() and not getattr(block, _WARNED, False):
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            setattr(block, _WARNED, True)
            warnings.warn(
                f"frozen block {type(block).__name__} received an input that requires grad: whatever "
                "runs before it gets no gradient through it now. Pass the modules that run before "
                "block 0 as stem=... so that they freeze with it",
                stacklevel=2,
            )
    block.__dict__.setdefault(_GRAD_MODES, []).append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _exit_no_grad(block: nn.Module, args: tuple, output) -> None:
    modes = block.__dict__.get(_GRAD_MODES)
    if modes:
        torch.set_grad_enabled(modes.pop())


def frozen_prefix_length(blocks: Sequence[nn.Module]) -> int:
    """How many leading blocks :func:`freeze_prefix` has frozen (0 when none)."""
    k = 0
    for blk in blocks:
        if _NO_GRAD not in blk.__dict__:
            break
        k += 1
    return k


def freeze_prefix(
    blocks: Sequence[nn.Module],
    k: int,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    stem: Iterable[nn.Module | nn.Parameter] = (),
) -> None:
    """Freeze ``blocks[0..k-1]`` (and ``stem`` when k > 0); unfreeze the rest. Any model.

    :func:`freeze_set` with the prefix 0..k-1 and the stem frozen with block 0. Frozen parameters
    get ``requires_grad_(False)``, their ``.grad`` and their optimizer state (e.g. Adam moments)
    are dropped, so optimizers that skip parameters without a gradient (all of torch.optim) leave
    them bitwise unchanged; each frozen block's forward runs under ``no_grad`` (a forward
    pre-hook and an always-called forward hook). Unfreezing gives parameters back the
    ``requires_grad`` they had before. Buffers (BatchNorm running statistics) follow the
    module's train/eval mode as usual. ``stem``: modules or parameters that run before block 0
    (a patch embedding, a class token): frozen with block 0, since no gradient reaches them
    through a frozen block anyway.
    """
    blocks = list(blocks)
    if not 0 <= k < len(blocks):
        raise ScheduleError(f"cannot freeze {k} of {len(blocks)} blocks: at least one must train")
    freeze_set(blocks, range(k), optimizer, stem=stem, stem_frozen=k > 0)


def freeze_set(
    blocks: Sequence[nn.Module],
    frozen: Iterable[int],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    stem: Iterable[nn.Module | nn.Parameter] = (),
    stem_frozen: bool = False,
) -> None:
    """Freeze exactly the blocks ``frozen`` (indices, any subset) and, with ``stem_frozen``, the
    ``stem``; unfreeze everything else. The only place that touches ``requires_grad`` and
    optimizer state (see :func:`freeze_prefix`). Only the leading run of frozen blocks 0..p-1
    runs under ``no_grad``, and only when nothing below it trains (the stem frozen, or no stem
    given): a frozen block above a trainable part keeps its autograd graph, so gradients still
    reach what is below it; it only skips its own weight gradients."""
    blocks = list(blocks)
    idx = sorted(set(frozen))
    if any(not is_int(i) or not 0 <= i < len(blocks) for i in idx):
        raise ScheduleError(f"cannot freeze blocks {idx}: indices must be within 0..{len(blocks) - 1}")
    if len(idx) >= len(blocks):
        raise ScheduleError(f"cannot freeze all {len(blocks)} blocks: at least one must train")
    stem_params = _stem_parameters(stem)
    chosen = set(idx)
    frozen_params = [p for i in idx for p in blocks[i].parameters()] + (stem_params if stem_frozen else [])
    frozen_ids = {id(p) for p in frozen_params}
    for p in frozen_params:
        if not hasattr(p, _SAVED_FLAG):
            setattr(p, _SAVED_FLAG, p.requires_grad)
        p.requires_grad_(False)
        p.grad = None
        if optimizer is not None:
            optimizer.state.pop(p, None)
    thawed = [p for i, blk in enumerate(blocks) if i not in chosen for p in blk.parameters()]
    thawed += [] if stem_frozen else stem_params
    for p in thawed:
        if id(p) not in frozen_ids and hasattr(p, _SAVED_FLAG):
            p.requires_grad_(getattr(p, _SAVED_FLAG))
            delattr(p, _SAVED_FLAG)
    no_grad = FrozenSet(frozenset(idx), stem_frozen or not stem_params).no_grad_prefix
    for i, blk in enumerate(blocks):
        hooked = _NO_GRAD in blk.__dict__
        if i < no_grad and not hooked:
            blk.__dict__[_NO_GRAD] = (
                blk.register_forward_pre_hook(_enter_no_grad),
                blk.register_forward_hook(_exit_no_grad, always_call=True),
            )
        elif i >= no_grad and hooked:
            for handle in blk.__dict__.pop(_NO_GRAD):
                handle.remove()


def as_schedule(schedule: FreezeSchedule | dict[str, Any], n_blocks: int | None = None) -> FreezeSchedule:
    """A :class:`FreezeSchedule` from a schedule dict (the JSON of ``python -m analysis schedule``)
    or a schedule; ``n_blocks`` (when given) must match."""
    sched = schedule if isinstance(schedule, FreezeSchedule) else FreezeSchedule.from_dict(schedule)
    if n_blocks is not None and sched.n_blocks != n_blocks:
        raise ScheduleError(f"schedule is for n_blocks={sched.n_blocks} but {n_blocks} blocks were given")
    return sched


def apply_schedule(
    schedule: FreezeSchedule | dict[str, Any],
    blocks: Sequence[nn.Module],
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    stem: Iterable[nn.Module | nn.Parameter] = (),
) -> int:
    """Freeze the prefix ``schedule`` holds at training ``step`` (call it at the start of every
    step of your own loop); returns that prefix length. Does nothing while the prefix is already
    in force, so it costs a few microseconds on other steps. ``schedule``: the JSON dict of
    ``python -m analysis schedule`` (load it with ``json.load``) or a :class:`FreezeSchedule`."""
    sched = as_schedule(schedule, len(blocks))
    k = sched.frozen_at(step)
    if k != frozen_prefix_length(blocks):
        freeze_prefix(blocks, k, optimizer, stem=stem)
    return k


def set_frozen_prefix(model: nn.Module, optimizer: torch.optim.Optimizer | None, k: int) -> None:
    """Freeze encoder blocks 0..k-1 of a :class:`core.model.VideoMAE` (and its patch embedding
    when k > 0); unfreeze the rest: :func:`freeze_prefix` on ``model.blocks`` with the patch
    embedding as stem. The model runs its frozen prefix, patch embedding included, under
    ``no_grad`` itself too (``model.frozen_prefix``, which only this function writes)."""
    freeze_prefix(model.blocks, k, optimizer, stem=(model.patch_embed,))
    model.frozen_prefix = k


def set_frozen(model: nn.Module, optimizer: torch.optim.Optimizer | None, frozen: FrozenSet) -> None:
    """Freeze exactly ``frozen`` (blocks and stem) of a :class:`core.model.VideoMAE`:
    :func:`freeze_set` on ``model.blocks`` with the patch embedding as stem (the position table
    is a fixed buffer). ``model.frozen_prefix`` becomes the part that runs under ``no_grad``
    (:attr:`FrozenSet.no_grad_prefix`); with the stem trainable that is 0, and gradients reach the
    stem through every frozen block. The prefix with the stem is :func:`set_frozen_prefix`."""
    freeze_set(model.blocks, frozen.blocks, optimizer, stem=(model.patch_embed,), stem_frozen=frozen.stem)
    model.frozen_prefix = frozen.no_grad_prefix


def freeze_all(model: nn.Module) -> None:
    """Fix every weight for inference-time gradients (attribution): ``requires_grad_(False)`` on
    all parameters, ``frozen_prefix`` left at 0 so that gradients still reach inputs and
    activations through every block."""
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
