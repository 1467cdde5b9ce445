"""``bench tracking``: the trainer's loop with probes+tracking off and on, in lock-step.

Two runs of the same config, one with probes, MLflow logging and checkpoints, one with none of
them (``train(track=False)``, probes off), train in two threads that take turns one step at a
time (``timing.LockStep``), so that what the machine does meanwhile falls on both alike; each
repeat's ratio is the on-loop's time over the off-loop's, over whole periods of the probe and
checkpoint intervals (so each costs its configured share). The mean over repeats gets a 95%
bootstrap interval; repeats go on (up to a limit) until it is within ``--within`` (1%), and it
says when it is not. Also on each loop's own thread's CPU clock (leaving out the threads a loop
starts, e.g. the probe-file writer). Set-up (run creation, calibration) and the end (held-out
loss, final probe, uploads) are outside the timed steps.
Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import tempfile
import threading

from experiments import config_path
from experiments.bench.timing import LockStep, interval_text, mean_ratio_interval, say_resolved

SKIP = 5  # warm-up steps of each loop, not timed


@contextlib.contextmanager
def _turns(local: threading.local, total: int):
    """Every trainer step of a thread that set ``local.lock`` takes its turn in that lock."""
    from core import train as trainer

    plain = trainer._Run.step_once

    def step_once(self, bar) -> None:
        lock = getattr(local, "lock", None)
        if lock is None:
            return plain(self, bar)
        lock.step_begins(local.who, self.done.step)
        plain(self, bar)
        if self.done.step == total:
            lock.loop_ends(local.who, total)

    trainer._Run.step_once = step_once
    try:
        yield
    finally:
        trainer._Run.step_once = plain


def bench_tracking(
    config: str,
    overrides: list[str] | None,
    repeats: int,
    steps: int | None = None,
    max_repeats: int | None = None,
    within: float = 0.01,
    threads: int = 1,
) -> dict:
    """``repeats`` lock-step repeats at least (more, up to ``max_repeats``, until the on/off
    ratio's 95% interval is within ``within``), after a warm-up repeat left out of the statistics.
    ``steps``: about this many steps per run (default: the config's); the timed steps are the
    nearest whole number of probe-and-checkpoint periods (at least one, where ``steps`` is at
    least half a period; else all but the warm-up and the last step), after ``SKIP`` warm-up steps."""
    import torch

    from core.config import load_config
    from core.train import train

    cfg_on = load_config(config_path(config), [*(overrides or []), *([f"train.steps={steps}"] if steps else [])])
    period = math.lcm(cfg_on.probe.every, cfg_on.train.checkpoint_every)
    room = max(cfg_on.train.steps - SKIP - 1, 1)
    timed = period * round(room / period) if round(room / period) >= 1 else room
    total = SKIP + timed + 1
    cfg_on.train.steps = total
    cfg_off = cfg_on.model_copy(deep=True)
    cfg_off.probe.enabled = False
    max_repeats = max(repeats, max_repeats or repeats)
    ratios, cpu_ratios, on_ms, off_ms, warm_up = [], [], [], [], None
    local = threading.local()
    with tempfile.TemporaryDirectory() as tmp, _turns(local, total):
        uri = f"sqlite:///{tmp}/bench.db"
        r = 0
        while r <= repeats or (r <= max_repeats and not _resolved(ratios, within)):
            label = f"repeat {r}/{repeats}" if r else "warm-up repeat"
            print(f"bench tracking: {label}, {total} steps each, off and on in lock-step", file=sys.stderr)
            lock = LockStep(SKIP, timed)
            lock.turn = r % 2  # the first turn: the tracked loop every other repeat
            errors: list[BaseException] = []

            def run(who: int, lock=lock, errors=errors) -> None:
                local.lock, local.who = lock, who
                torch.set_num_threads(threads)  # per thread: OpenMP's thread count is a per-thread setting
                try:
                    if who == 0:
                        train(cfg_on, tracking_uri=uri, progress=False)
                    else:
                        train(cfg_off, track=False, progress=False)
                except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
                    errors.append(err)
                    lock.fail()

            workers = [threading.Thread(target=run, args=(who,)) for who in (0, 1)]  # 0: tracked
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            if errors:
                raise errors[0]
            if lock.steps != [timed, timed]:
                raise RuntimeError(f"bench tracking: timed {lock.steps} steps, expected {timed} in each loop")
            if r == 0:
                warm_up = round(lock.spent[0] / lock.spent[1], 4)
            else:
                ratios.append(lock.spent[0] / lock.spent[1])
                cpu_ratios.append(lock.cpu[0] / lock.cpu[1])
                on_ms.append(1000 * lock.spent[0] / timed)
                off_ms.append(1000 * lock.spent[1] / timed)
            r += 1
    wall, cpu = mean_ratio_interval(ratios), mean_ratio_interval(cpu_ratios)
    return {
        "steps": total,
        "timed_steps": timed,
        "probe_every": cfg_on.probe.every,
        "checkpoint_every": cfg_on.train.checkpoint_every,
        "log_every": cfg_on.train.log_every,
        "repeats": len(ratios),
        "within": within,
        "off_ms": round(statistics.median(off_ms), 3),
        "on_ms": round(statistics.median(on_ms), 3),
        **wall,
        "resolved": _resolved(ratios, within),
        "cpu_ratio": cpu["ratio"],
        "cpu_low": cpu["low"],
        "cpu_high": cpu["high"],
        "warm_up_ratio": warm_up,
        "ratios": [round(x, 4) for x in ratios],
    }


def _resolved(ratios: list[float], within: float) -> bool:
    from core.timemodel import resolves

    if len(ratios) < 3:
        return False
    r = mean_ratio_interval(ratios)
    return resolves(r["low"], r["high"], r["ratio"], within)


def print_tracking(result: dict) -> None:
    print(
        f"{result['timed_steps']} steps timed of {result['steps']} (probe.every {result['probe_every']}, "
        f"checkpoint_every {result['checkpoint_every']}, log_every {result['log_every']}), tracking off and "
        f"on in lock-step, {result['repeats']} repeats"
    )
    print(f"loop time per step, median over repeats: off {result['off_ms']:.2f} ms, on {result['on_ms']:.2f} ms")
    print(f"on / off, mean of per-repeat ratios [95% bootstrap interval]: {interval_text(result)}")
    print(say_resolved(result["resolved"], result["within"], "ratio", "--max-repeats"))
    cpu = {"ratio": result["cpu_ratio"], "low": result["cpu_low"], "high": result["cpu_high"]}
    print(f"on / off on each loop's own thread's CPU clock: {interval_text(cpu)}")
    print(f"each repeat's ratio: {result['ratios']} (warm-up repeat, left out: {result['warm_up_ratio']})")
