"""Measured step time per schedule stage (``time_model.json``), beside the counted FLOP model.

Counted FLOPs predict counted FLOPs exactly, but not wall-clock time: part of a step does not
shrink when blocks freeze (data, masking, targets, losses, the decoder, elementwise work). So
each run measures its own step time per stage ``k`` (the schedule's ``frozen`` count, as in
``flop_model.json``), cheaply:

- *training*: the wall time of every training step, probe time excluded, filed under the stage
  it ran at; the probes' time is kept as one overhead per step, the same at every k. The same
  again on the process's CPU clock (``cpu``), which other jobs on a shared machine inflate less;
- *calibration*: before the first step, a few timed steps at each stage the run will pass
  through (its schedule's stages and k=0, or k=0 and the deepest k when it has no schedule),
  interleaved so that a change in machine load hits every k alike, on a copy of the model (the
  trainer's ``calibrate``): the run's weights, optimizer state and RNG are untouched.

A prediction needs times *relative* to k=0: ``r(k) = t(k) / t(0)``. Where k and 0 were both
measured in training, r(k) comes from the training medians; else from the calibration medians
(for a monitor's calibration, which times the model's step without the loop around it, with the
loop's own time per step, training's t(0) less the calibration's, added to every stage);
k measured in neither is read off the affine FLOP model ``r(k) = a + b * flops(k) / flops(0)``
fitted to the measured points (``a``: the share of a k=0 step that freezing cannot shrink);
with no measured point but k=0, r(k) = flops(k) / flops(0). The saving of a schedule over
``total_steps`` is then ``1 - sum_k n_k (r(k) + w) / (total_steps (1 + w))``, ``n_k`` the
steps at stage k and ``w`` the overhead per step relative to t(0).

Every timing here is summarised by its median with a distribution-free interval
(:func:`median_interval`). Plain Python, no torch: ``analysis`` and the dashboard read it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import LayerLockError

# Below this many samples a stage's median is not used for a ratio (calibration gives 5 by default).
MIN_SAMPLES = 2
# Samples kept per stage (and source): beyond it every other sample is dropped, so a very long
# run keeps an even thinning of its whole history in its checkpoints.
MAX_SAMPLES = 4096
KIND = "measured step time per schedule stage"


# ----------------------------------------------------------------------------- statistics


def median_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """``(median, low, high)``: the median and a distribution-free interval for it.

    The interval is ``[x_(j), x_(n+1-j)]`` of the sorted values, with the largest j whose
    coverage (from the Binomial(n, 1/2) distribution of the count below the true median) is at
    least ``level``: no assumption about the shape of the timing distribution. Too few values
    for that coverage (n < 6 at 95%) give ``None`` bounds.
    """
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval of no values")
    med = statistics.median(xs)
    # P(X <= j) for X ~ Binomial(n, 1/2), in exact integers (2.0 ** n overflows past n = 1023).
    j, term, below, total = 0, 1, 1, 1 << n  # term = comb(n, j), below = sum of comb(n, i), i <= j
    while j + 1 <= n // 2 and below / total <= (1 - level) / 2:
        j += 1
        term = term * (n - j + 1) // j
        below += term
    if j == 0:
        return med, None, None
    return med, xs[j - 1], xs[n - j]


def resolves(low: float | None, high: float | None, centre: float, within: float) -> bool:
    """Whether an interval around ``centre`` is narrow enough: half-width <= ``within`` (relative)."""
    if low is None or high is None or centre == 0:
        return False
    return (high - low) / 2 <= within * abs(centre) * (1 + 1e-9)  # 1e-9: rounding of the bounds


# ----------------------------------------------------------------------------- recording


@dataclass
class _Clock:
    """One clock's record: per stage, sampled step times without probes (training, calibration),
    and the sums of the training steps with and without probes, and their count."""

    training: dict[int, list[float]] = field(default_factory=dict)
    calibration: dict[int, list[float]] = field(default_factory=dict)
    whole_sum: dict[int, float] = field(default_factory=dict)  # with probes (what train/wall_s adds up)
    step_sum: dict[int, float] = field(default_factory=dict)  # without
    steps: dict[int, int] = field(default_factory=dict)  # training steps per k (never thinned)

    def add(self, k: int, step_s: float, whole_s: float) -> None:
        _append(self.training.setdefault(k, []), step_s)
        self.whole_sum[k] = self.whole_sum.get(k, 0.0) + whole_s
        self.step_sum[k] = self.step_sum.get(k, 0.0) + step_s
        self.steps[k] = self.steps.get(k, 0) + 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "training": {int(k): list(v) for k, v in self.training.items()},
            "calibration": {int(k): list(v) for k, v in self.calibration.items()},
            "whole_sum": dict(self.whole_sum),
            "step_sum": dict(self.step_sum),
            "steps": dict(self.steps),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _Clock:
        def numbers(key: str, kind: type) -> dict:
            return {int(k): kind(v) for k, v in state.get(key, {}).items()}

        return cls(
            {int(k): [float(x) for x in v] for k, v in state.get("training", {}).items()},
            {int(k): [float(x) for x in v] for k, v in state.get("calibration", {}).items()},
            numbers("whole_sum", float),
            numbers("step_sum", float),
            numbers("steps", int),
        )

    def to_dict(self) -> dict[str, Any]:
        n_steps = sum(self.steps.values())
        probes = sum(self.whole_sum.values()) - sum(self.step_sum.values())
        return {
            "training": {
                str(k): {
                    **_summary(v),
                    "steps": self.steps.get(k, len(v)),
                    "mean_s": self.step_sum[k] / self.steps[k] if self.steps.get(k) else None,
                }
                for k, v in sorted(self.training.items())
                if v
            },
            "calibration": {str(k): _summary(v) for k, v in sorted(self.calibration.items()) if v},
            # Probe time per training step: the same at every k. Measured, not the gap between
            # mean and median step, which on a shared machine is mostly other jobs' load.
            "overhead_s_per_step": probes / n_steps if n_steps else 0.0,
            "total_s": sum(self.whole_sum.values()),  # the training steps, probes included
            "total_steps": n_steps,
        }


@dataclass
class StepTimer:
    """Step times of one run, per stage k, as the trainer measures them, on two clocks: wall
    time (what a user waits for) and the process's CPU time (all threads; what other jobs on a
    shared machine do not inflate, so it compares runs made at different loads).

    ``add`` files one training step: ``step_s`` its time without probes, ``whole_s`` its whole
    time (what ``train/wall_s`` adds up), and the same on the CPU clock when given.
    ``add_calibration`` files one calibration step.
    """

    wall: _Clock = field(default_factory=_Clock)
    cpu: _Clock = field(default_factory=_Clock)

    @property
    def training(self) -> dict[int, list[float]]:
        return self.wall.training

    @property
    def calibration(self) -> dict[int, list[float]]:
        return self.wall.calibration

    def add(
        self, k: int, step_s: float, whole_s: float, cpu_step_s: float | None = None, cpu_whole_s: float | None = None
    ) -> None:
        self.wall.add(k, step_s, whole_s)
        if cpu_step_s is not None:
            self.cpu.add(k, cpu_step_s, cpu_step_s if cpu_whole_s is None else cpu_whole_s)

    def add_calibration(self, k: int, step_s: float, cpu_s: float | None = None) -> None:
        _append(self.wall.calibration.setdefault(k, []), step_s)
        if cpu_s is not None:
            _append(self.cpu.calibration.setdefault(k, []), cpu_s)

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (what a ``weights_only`` checkpoint may hold)."""
        return {"wall": self.wall.state_dict(), "cpu": self.cpu.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.wall = _Clock.from_state(state.get("wall", {}))
        self.cpu = _Clock.from_state(state.get("cpu", {}))

    def to_dict(self, flops_per_step: Mapping[Any, float], **meta: Any) -> dict[str, Any]:
        """The ``time_model.json`` content: per-stage summaries and overhead on the wall clock
        (top level) and the CPU clock (``cpu``), and the FLOPs they are read against."""
        out = {"kind": KIND, **meta, **self.wall.to_dict()}
        if self.cpu.training or self.cpu.calibration:
            out["cpu"] = self.cpu.to_dict()
        out["flops_per_step"] = {str(int(k)): float(v) for k, v in flops_per_step.items()}
        return out


def _append(samples: list[float], value: float) -> None:
    samples.append(float(value))
    if len(samples) > MAX_SAMPLES:
        del samples[::2]


def _summary(samples: Sequence[float]) -> dict[str, Any]:
    med, lo, hi = median_interval(samples)
    return {"median_s": med, "low_s": lo, "high_s": hi, "n": len(samples)}


def calibrate(
    timer: StepTimer,
    stages: Sequence[int],
    rounds: int,
    set_stage: Callable[[int], None],
    step: Callable[[int], None],
    sync: Callable[[], None] | None = None,
) -> None:
    """Time ``rounds`` steps at each stage, interleaved across stages, into ``timer``'s calibration.

    Round 0 warms every stage up (allocations, optimizer state) and is not kept; the order of the
    stages is reversed every other round, so that a drift in machine load hits every stage alike.
    ``set_stage(k)`` puts the model at stage k, ``step(i)`` runs calibration step i (counted from
    0 over all rounds and stages) and ``sync()``, when given, waits for the device before the
    clocks are read. The trainer and :class:`core.monitor.LayerMonitor` both calibrate with it.
    """
    ks, i = list(stages), 0
    for r in range(rounds + 1):
        for k in ks if r % 2 == 0 else ks[::-1]:
            set_stage(k)
            t0, c0 = time.perf_counter(), time.process_time()
            step(i)
            if sync is not None:
                sync()
            if r:
                timer.add_calibration(k, time.perf_counter() - t0, time.process_time() - c0)
            i += 1


def calibration_stages(stages: Iterable[int], depth: int) -> list[int]:
    """The stages a run calibrates: k=0 and its schedule's stages, or k=0 and the deepest k
    (``depth - 1``) when it has none, so the affine FLOP model has two ends to stand on."""
    ks = {0, *(int(k) for k in stages)}
    if ks == {0} and depth > 1:
        ks.add(depth - 1)
    return sorted(ks)


# ----------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class TimeTable:
    """Step time relative to k=0 for every stage k, and where each number came from.

    ``ratio[k]``: t(k) / t(0); ``source[k]``: ``training``, ``calibration``, ``affine fit`` or
    ``flops``; ``overhead``: overhead per step / t(0); ``intercept``: the fitted share of a k=0
    step that freezing cannot shrink (None without two measured stages).
    """

    ratio: tuple[float, ...]
    source: tuple[str, ...]
    overhead: float
    intercept: float | None
    step_s: float  # t(0) in seconds

    def describe(self) -> str:
        measured = [k for k, s in enumerate(self.source) if s in ("training", "calibration")]
        text = f"measured step times (time_model.json) at k = {', '.join(map(str, measured))}"
        if any(s == "affine fit" for s in self.source):
            text += f"; other k from the affine FLOP fit (unshrinkable share {self.intercept:.1%})"
        elif any(s == "flops" for s in self.source):
            text += "; other k proportional to counted FLOPs (nothing else measured)"
        return text


def _flops(time_model: Mapping[str, Any], flop_model: Mapping[str, Any] | None) -> list[float]:
    table = (flop_model or {}).get("per_step") or time_model.get("flops_per_step") or {}
    try:
        flops = {int(k): float(v) for k, v in table.items()}
    except (TypeError, ValueError, AttributeError):
        raise LayerLockError("time model: 'flops_per_step' must map integer stages to numbers") from None
    if not flops or 0 not in flops or flops[0] <= 0:
        raise LayerLockError("time model: needs counted FLOPs per stage, positive at k=0")
    return [flops.get(k, math.nan) for k in range(max(flops) + 1)]


def _medians(time_model: Mapping[str, Any], part: str) -> dict[int, float]:
    out = {}
    for k, s in (time_model.get(part) or {}).items():
        try:
            med, n = float(s["median_s"]), int(s["n"])
        except (KeyError, TypeError, ValueError):
            raise LayerLockError(f"time model: '{part}' entries need median_s and n") from None
        if n >= MIN_SAMPLES and math.isfinite(med) and med > 0:
            out[int(k)] = med
    return out


def time_table(
    time_model: Mapping[str, Any], flop_model: Mapping[str, Any] | None = None, clock: str = "wall"
) -> TimeTable:
    """Relative step time for every stage (see the module docstring for the rules).

    ``flop_model`` (``flop_model.json``) supplies FLOPs per stage for the fit; the time model's
    own ``flops_per_step`` otherwise. ``clock``: ``wall`` or ``cpu`` (the CPU-time record).
    Raises LayerLockError for a time model that cannot be read or that measured k=0 nowhere.
    """
    if not isinstance(time_model, Mapping):
        raise LayerLockError("time model: expected a JSON object")
    flops = _flops(time_model, flop_model)
    model_step = bool(time_model.get("calibration_step"))  # a monitor's: the model's step, not the loop's
    if clock == "cpu":
        if not isinstance(time_model.get("cpu"), Mapping):
            raise LayerLockError("time model: no CPU-time record")
        time_model = time_model["cpu"]
    f_rel = [f / flops[0] for f in flops]
    train, calib = _medians(time_model, "training"), _medians(time_model, "calibration")
    measured: dict[int, tuple[float, str]] = {}
    if 0 in calib:
        # A monitor's calibration (``calibration_step`` says what it timed) runs the model's step on
        # a fixed batch, not the loop around it (data loading, a framework's own work per step). That
        # part costs the same at every k: it is what training at k=0 took beyond the calibration's
        # k=0, added to every calibrated stage (nothing when the calibration was the slower one). The
        # trainer's calibration runs its whole update, so a difference there is machine load, which
        # scales every stage alike: its ratios are taken as they are.
        extra = max(train[0] - calib[0], 0.0) if model_step and 0 in train else 0.0
        measured.update({k: ((t + extra) / (calib[0] + extra), "calibration") for k, t in calib.items()})
    if 0 in train:
        measured.update({k: (t / train[0], "training") for k, t in train.items()})
    if 0 not in measured:
        raise LayerLockError("time model: no step time measured at k=0 (nothing to compare against)")
    step_s = train.get(0, calib.get(0))
    points = [(f_rel[k], r) for k, (r, _) in measured.items() if k < len(f_rel) and math.isfinite(f_rel[k])]
    intercept = slope = None
    if len({round(f, 12) for f, _ in points}) >= 2:
        intercept, slope = _fit_line(points)
    ratio, source = [], []
    for k in range(len(flops)):
        if k in measured:
            r, s = measured[k]
        elif slope is not None and math.isfinite(f_rel[k]):
            r, s = intercept + slope * f_rel[k], "affine fit"
        else:
            r, s = f_rel[k], "flops"
        ratio.append(r)
        source.append(s)
    overhead = float(time_model.get("overhead_s_per_step") or 0.0)
    return TimeTable(tuple(ratio), tuple(source), max(overhead, 0.0) / step_s, intercept, step_s)


def _fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def within_run_saving(time_model: Mapping[str, Any], clock: str = "wall") -> float | None:
    """What a run's frozen stages saved, measured within the run: ``1 - total / (steps * (t(0) +
    overhead))``, its time (probes included) against the same steps at its own unfrozen pace,
    ``t(0)`` the mean of its unfrozen steps (a mean, like the total it is compared with). None
    without training steps at k=0. A change in machine load between this run and another does
    not enter it (one within the run does)."""
    record = time_model.get("cpu") if clock == "cpu" else time_model
    if not isinstance(record, Mapping):
        return None
    t0 = ((record.get("training") or {}).get("0") or {}).get("mean_s")
    total, steps = record.get("total_s"), record.get("total_steps")
    if not t0 or not total or not steps:
        return None
    return 1.0 - float(total) / (int(steps) * (float(t0) + float(record.get("overhead_s_per_step") or 0.0)))


def predicted_time_saving(segments: Iterable[tuple[int, int, int]], total_steps: int, table: TimeTable) -> float:
    """``1 - time(schedule) / time(nothing frozen)`` over ``total_steps``.

    ``segments``: ``(start, stop, k)`` covering the run (``analysis.flops.stage_segments``).
    """
    if total_steps <= 0:
        raise LayerLockError(f"total_steps must be positive, got {total_steps}")
    w = table.overhead
    spent = 0.0
    for start, stop, k in segments:
        if k >= len(table.ratio) or not math.isfinite(table.ratio[k]):
            raise LayerLockError(f"time model has no entry for stage {k} (it covers k < {len(table.ratio)})")
        spent += (stop - start) * (table.ratio[k] + w)
    return 1.0 - spent / (total_steps * (1.0 + w))
