"""What every bench shares: side-by-side timing and its statistics.

Two kinds of comparison, both side by side in one process so that a drift in the machine's load
falls on every side alike:

- levels (k = 0..n-1 frozen blocks): :func:`interleaved_timings` times each level in rounds, the
  order reversed every other round, and :func:`ratio_stats` gives each level's ratio to k=0 as a
  median over rounds with its distribution-free interval (``core.timemodel.median_interval``);
- two modes (tracking off/on, plain/monitored, plain/scheduled): :func:`alternated` orders each
  pair, :func:`per_step_ratio` and :func:`mean_ratio_interval` give the ratio with a bootstrap
  interval over runs; where each mode is a loop the bench does not own (the trainer's, a
  framework's), :class:`LockStep` runs the two loops in two threads taking turns one step at a
  time, so that every repeat's ratio has the machine's drift divided out.

A comparison goes on until its interval is within a resolution (``core.timemodel.resolves``),
and :func:`say_resolved` says when it is not. ``core.timemodel.calibrate`` is the trainer's
few-step version of the level interleave (one step per stage per round, a fixed number of
rounds); a bench times blocks of steps after untimed warm-up steps, until resolved.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from core.timemodel import median_interval, resolves


def machine() -> dict:
    """What a timing depends on besides the code: the torch build (a CUDA build of torch running on
    a CPU pays more per op than the CPU build, docs/performance.md), its CPU kernels' instruction
    set, the processor, its cores and the torch threads in use."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def machine_line(info: dict) -> str:
    """:func:`machine` in one line, printed first by every timing bench."""
    return (
        f"torch {info['torch']} ({info['build']} build, {info['cpu_capability']} kernels) on {info['cpu']}, "
        f"{info['cores']} cores, {info['threads']} torch thread(s)"
    )


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Run ``fn()`` once: its wall and process CPU seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def alternated(r: int, first: str, second: str) -> tuple[str, str]:
    """The order of pair ``r``: ``(first, second)``, swapped every other pair."""
    return (first, second) if r % 2 == 0 else (second, first)


def ratio_stats(num: Sequence[float], den: Sequence[float], within: float) -> dict:
    """Paired ratios ``num[i] / den[i]`` (one per interleaved round or repeat): their median, its
    95% distribution-free interval (``core.timemodel.median_interval``) and whether the interval
    resolves ``within`` (half-width <= within x median)."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    med, lo, hi = median_interval(ratios)
    return {
        "ratio": round(med, 4),
        "low": None if lo is None else round(lo, 4),
        "high": None if hi is None else round(hi, 4),
        "resolved": resolves(lo, hi, med, within),
    }


def per_step_ratio(
    num_runs: list[list[float]], den_runs: list[list[float]], within: float, n_boot: int = 2000, seed: int = 0
) -> dict:
    """Two sets of runs of the same steps (each run: every step's seconds, in step order): the
    ratio of their summed per-step medians over runs, with a 95% bootstrap interval (runs
    resampled with replacement within each set, ``n_boot`` times) and whether it resolves
    ``within``. Step i does the same work in every run of a set, so the per-step median drops
    another process's burst from one run while keeping a cost that comes back at the same step
    in every run (a probe, a log line, a checkpoint); whole-run times swing by +-10% with the
    machine's load and cannot resolve a few percent."""
    import numpy as np

    a, b = np.asarray(num_runs, dtype=float), np.asarray(den_runs, dtype=float)  # (runs, steps)
    point = float(np.median(a, axis=0).sum() / np.median(b, axis=0).sum())
    if len(a) < 3 or len(b) < 3:
        return {"ratio": round(point, 4), "low": None, "high": None, "resolved": False}
    rng = np.random.default_rng(seed)
    boots = [
        np.median(a[rng.integers(len(a), size=len(a))], axis=0).sum()
        / np.median(b[rng.integers(len(b), size=len(b))], axis=0).sum()
        for _ in range(n_boot)
    ]
    lo, hi = (float(v) for v in np.percentile(boots, [2.5, 97.5]))
    return {
        "ratio": round(point, 4),
        "low": round(lo, 4),
        "high": round(hi, 4),
        "resolved": resolves(lo, hi, point, within),
    }


def mean_ratio_interval(ratios: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """The mean of per-repeat ratios with a 95% bootstrap interval over repeats (None bounds
    below 3 repeats). For ratios of two loops stepped in lock-step, where each repeat's ratio
    already has the machine's drift divided out."""
    import numpy as np

    mean = float(np.mean(ratios))
    low = high = None
    if len(ratios) >= 3:
        rng = np.random.default_rng(seed)
        boots = [float(np.mean(rng.choice(ratios, size=len(ratios)))) for _ in range(n_boot)]
        low, high = (round(float(v), 4) for v in np.percentile(boots, [2.5, 97.5]))
    return {"ratio": round(mean, 4), "low": low, "high": high}


def interleaved_timings(
    levels: int,
    set_level: Callable[[int], None],
    step: Callable[[], None],
    rounds: int,
    steps_per_round: int,
    warmup: int,
    max_rounds: int | None = None,
    within: float = 0.01,
    desc: str = "bench",
) -> dict:
    """Time ``step()`` at every level k = 0..levels-1 (``set_level(k)`` before each), in rounds.

    Each round times ``steps_per_round`` steps at every k (order reversed every other round, so
    drift in machine load hits every k alike) after ``warmup`` untimed ones, and keeps their
    median, in wall and CPU time. Rounds go on past ``rounds`` until every k's ratio to k=0
    (:func:`ratio_stats`) is resolved to ``within`` or ``max_rounds`` is reached. Returns
    ``{"wall": {k: per-round medians}, "cpu": {...}, "all": {k: every timed step}, "rounds": n}``.
    """
    from tqdm.auto import tqdm

    max_rounds = max(rounds, max_rounds or rounds)
    wall: dict[int, list[float]] = {k: [] for k in range(levels)}
    cpu: dict[int, list[float]] = {k: [] for k in range(levels)}
    everything: dict[int, list[float]] = {k: [] for k in range(levels)}

    def resolved() -> bool:
        return all(ratio_stats(wall[k], wall[0], within)["resolved"] for k in range(1, levels))

    r = 0
    with tqdm(total=max_rounds * levels, desc=desc, unit="k", file=sys.stderr) as bar:
        while r < rounds or (r < max_rounds and not resolved()):
            for k in list(range(levels)) if r % 2 == 0 else list(reversed(range(levels))):
                set_level(k)
                for _ in range(warmup):
                    step()
                w, c = [], []
                for _ in range(steps_per_round):
                    wall_s, cpu_s = timed(step)
                    w.append(wall_s)
                    c.append(cpu_s)
                wall[k].append(statistics.median(w))
                cpu[k].append(statistics.median(c))
                everything[k] += w
                bar.update(1)
            r += 1
    return {"wall": wall, "cpu": cpu, "all": everything, "rounds": r}


def freezing_rows(timings: dict, flops: list[float], within: float) -> list[dict]:
    """Per k: median step time, its time and CPU ratio to k=0 with 95% intervals (from
    :func:`interleaved_timings`), against the FLOP ratio ``flops[k] / flops[0]``."""
    wall, cpu = timings["wall"], timings["cpu"]
    rows = []
    for k in range(len(flops)):
        t, c = ratio_stats(wall[k], wall[0], within), ratio_stats(cpu[k], cpu[0], within)
        f = flops[k] / flops[0]
        rows.append(
            {
                "frozen": k,
                "step_ms": round(statistics.median(timings["all"][k]) * 1000, 3),
                "flops": flops[k],
                "time_ratio": t["ratio"],
                "time_low": t["low"],
                "time_high": t["high"],
                "cpu_ratio": c["ratio"],
                "cpu_low": c["low"],
                "cpu_high": c["high"],
                "flop_ratio": round(f, 4),
                "time_vs_flop": round(t["ratio"] / f, 4),
                "cpu_vs_flop": round(c["ratio"] / f, 4),
                "resolved": t["resolved"],
            }
        )
    return rows


def interval_text(r: dict) -> str:
    """``ratio [low, high]`` of a :func:`ratio_stats`-like dict, or ``[too few]``."""
    if r["low"] is None:
        return f"{r['ratio']:.3f} [too few]"
    return f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def say_resolved(resolved: bool, within: float, what: str, more: str) -> str:
    if resolved:
        return f"every interval is within {within:.1%} of its {what}"
    return (
        f"CANNOT resolve {within:.1%}: some interval is wider than {within:.1%} of its {what} "
        f"(machine load varies); more repeats may narrow it ({more})"
    )


class LockStep:
    """Two training loops (two threads, or two processes) taking turns one training step at a time.

    Each loop's turn runs from the start of one of its steps to the start of its next one (its
    step, its callbacks, its next batch); only one loop runs at any moment, so what the machine
    does meanwhile (a slower clock, another process) falls on both loops alike, as in ``bench
    monitor``. Both loops start their first step together and finish together: attaching and
    closing (FLOP count, run creation, final probe, artifacts) run outside every timed turn.
    A loop's time is the sum of its turns over steps ``skip .. skip + timed - 1``: on the wall
    clock (``spent``) and on the loop's own thread's CPU clock (``cpu``, which leaves out the
    threads a loop starts: a prefetcher, a file writer). The state lives in shared memory of
    ``ctx`` (default: multiprocessing's spawn context), so a lock passed to two processes works as
    one shared by two threads: frameworks that keep process-wide state (the HF ``Trainer``'s
    ``accelerate`` state) need a process each."""

    def __init__(self, skip: int, timed: int, timeout: float = 900.0, ctx: Any = None) -> None:
        import multiprocessing

        ctx = ctx or multiprocessing.get_context("spawn")
        self.skip, self.timed, self.timeout = skip, timed, timeout
        self.cond = ctx.Condition()
        self._turn = ctx.Value("i", 0, lock=False)
        self._finished = ctx.Array("b", 2, lock=False)
        self._broken = ctx.Value("b", 0, lock=False)
        self.start = ctx.Barrier(2, timeout=timeout)
        self.end = ctx.Barrier(2, timeout=timeout)
        self._spent = ctx.Array("d", 2, lock=False)
        self._cpu = ctx.Array("d", 2, lock=False)
        self._steps = ctx.Array("i", 2, lock=False)
        self._t: list[tuple[float, float] | None] = [None, None]

    @property
    def turn(self) -> int:
        return self._turn.value

    @turn.setter
    def turn(self, who: int) -> None:
        self._turn.value = who

    @property
    def spent(self) -> list[float]:
        return list(self._spent)

    @property
    def cpu(self) -> list[float]:
        return list(self._cpu)

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    def _wait_turn(self, who: int) -> None:
        ready = lambda: self._broken.value or self._turn.value == who or self._finished[1 - who]  # noqa: E731
        with self.cond:
            if not self.cond.wait_for(ready, self.timeout):
                raise TimeoutError("lock-step: the other loop stopped taking turns")
            if self._broken.value:
                raise RuntimeError("lock-step: the other loop failed")

    def _pass(self, who: int) -> None:
        with self.cond:
            self._turn.value = 1 - who
            self.cond.notify_all()

    def step_begins(self, who: int, step: int) -> None:
        """At the start of training step ``step`` (0-based) of loop ``who``."""
        now = (time.perf_counter(), time.thread_time())
        if step == 0:
            self.start.wait()  # both attached: the first turns begin together
        else:
            if self.skip < step <= self.skip + self.timed:
                self._close(who, now)
            self._pass(who)
        self._wait_turn(who)
        self._t[who] = (time.perf_counter(), time.thread_time())

    def _close(self, who: int, now: tuple[float, float]) -> None:
        t0 = self._t[who]
        assert t0 is not None
        self._spent[who] += now[0] - t0[0]
        self._cpu[who] += now[1] - t0[1]
        self._steps[who] += 1

    def loop_ends(self, who: int, steps: int) -> None:
        """After the last step (``steps`` steps in all) of loop ``who``: close the last turn and
        wait for the other loop to finish its steps before either closes its run."""
        if self.skip < steps <= self.skip + self.timed:
            self._close(who, (time.perf_counter(), time.thread_time()))
        with self.cond:
            self._finished[who] = 1
            self._turn.value = 1 - who
            self.cond.notify_all()
        self.end.wait()

    def fail(self) -> None:
        with self.cond:
            self._broken.value = 1
            self.cond.notify_all()
        self.start.abort()
        self.end.abort()
