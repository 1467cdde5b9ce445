"""``bench monitor``: the README example's plain loop on its torchvision models, with and without
``LayerMonitor`` (probes every ``--every`` steps, gradient metrics every 25, MLflow logging to
sqlite), two copies of the model stepped in lock-step so that the machine's drifts fall on both;
attaching (FLOP count, calibration, run creation) and closing (final probe, artifacts) are
one-off costs, reported apart.
Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

from experiments.bench.own_loop import fresh
from experiments.bench.timing import mean_ratio_interval


def _timed(monitor, spent: list[float]) -> None:
    """Add the seconds spent inside the monitor's loop calls to ``spent[0]``."""
    for name in ("after_backward", "after_step"):
        call = getattr(monitor, name)

        def wrapped(*args, _call=call, **kwargs):
            t0 = time.perf_counter()
            try:
                return _call(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(monitor, name, wrapped)


def _process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid`` so far (Linux ``/proc``), None elsewhere."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def bench_monitor(model: str, steps: int, every: int, repeats: int) -> dict:
    """The example's loop with and without the monitor, in lock-step: two copies of the model
    (the same initial weights, the same batches) take step i in turn, the order swapped every
    step, each step timed. What the machine does meanwhile (another process, a slower clock)
    then falls on both loops alike, and a repeat's ratio (monitored loop's time / plain loop's)
    keeps the monitor's whole cost: its calls, its probes and log steps, and whatever its
    threads take from the loop's interpreter lock (the probe-file writer; MLflow's store calls
    run in the sender process, see core/tracking/sender.py). The ratio's 95% interval is a bootstrap
    over repeats. Also: the share of the time inside the monitor's calls, and the sender
    process's CPU time (on another core) against the loop's. One-off costs (attach: FLOP count,
    calibration, run; close: final probe, artifacts) are timed apart. A first repeat warms up
    (the store's tables, the first probe file, the first call of every path in this process)
    and is left out of the statistics; its ratio is reported as ``warm_up_ratio``."""
    from experiments.examples.own_loop import SETUPS, attach_monitor, make_optimizer, open_run, train_step

    plain, watched = SETUPS[model](), SETUPS[model]()
    initial = {k: v.clone() for k, v in plain.model.state_dict().items()}
    for s in (plain, watched):  # warm-up: first-call costs (allocator, lazy inits) are no loop's
        opt = make_optimizer(s)
        for step in range(min(steps, 10)):
            train_step(s, step, steps, opt)
    ratios, in_calls, sender_cpu, attach_s, close_s = [], [], [], [], []
    plain_ms, watched_ms = [], []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        for r in range(repeats + 1):
            print(f"bench monitor: {model}, " + (f"repeat {r}/{repeats}" if r else "warm-up repeat"), file=sys.stderr)
            fresh(plain, initial)
            fresh(watched, initial)
            t0 = time.perf_counter()
            writer = open_run(uri, f"bench-{model}")
            monitor = attach_monitor(watched, steps, every, writer=writer)
            writer.flush()  # the run's params, tags and models sent: a one-off cost, not the loop's
            attach_s.append(time.perf_counter() - t0)
            spent = [0.0]
            _timed(monitor, spent)
            sender = getattr(writer._sender, "proc", None)
            cpu0 = _process_cpu_s(sender.pid) if sender is not None else None
            loops = [(plain, make_optimizer(plain), None), (watched, make_optimizer(watched), monitor)]
            times = [[], []]
            for s, _, _ in loops:
                s.model.train()
            for step in range(steps):
                for i in (0, 1) if step % 2 == 0 else (1, 0):
                    s, opt, mon = loops[i]
                    t0 = time.perf_counter()
                    train_step(s, step, steps, opt, monitor=mon)
                    times[i].append(time.perf_counter() - t0)
            writer.flush()  # what the loop logged, sent: the sender's CPU for it is counted
            cpu1 = _process_cpu_s(sender.pid) if sender is not None else None
            plain_s, watched_s = sum(times[0]), sum(times[1])
            ratios.append(watched_s / plain_s)
            in_calls.append(spent[0] / (watched_s - spent[0]))
            if cpu0 is not None and cpu1 is not None:
                sender_cpu.append((cpu1 - cpu0) / watched_s)
            plain_ms.append(plain_s * 1000 / steps)
            watched_ms.append(watched_s * 1000 / steps)
            t0 = time.perf_counter()
            monitor.close()
            writer.finish()
            close_s.append(time.perf_counter() - t0)
    warm_up = ratios[0]
    for values in (ratios, in_calls, sender_cpu, attach_s, close_s, plain_ms, watched_ms):
        del values[:1]
    stats = mean_ratio_interval(ratios)
    return {
        "model": model,
        "steps": steps,
        "every": every,
        "repeats": repeats,
        "off_ms": round(statistics.median(plain_ms), 3),
        "on_ms": round(statistics.median(watched_ms), 3),
        "ratio": stats["ratio"],
        "low": stats["low"],
        "high": stats["high"],
        "in_calls_ratio": round(1 + statistics.median(in_calls), 4),
        "sender_cpu_share": round(statistics.median(sender_cpu), 4) if sender_cpu else None,
        "attach_s": round(statistics.median(attach_s), 3),
        "close_s": round(statistics.median(close_s), 3),
        "ratios": [round(v, 4) for v in ratios],
        "warm_up_ratio": round(warm_up, 4),
        "off_all_ms": [round(v, 3) for v in plain_ms],
        "on_all_ms": [round(v, 3) for v in watched_ms],
    }


def print_monitor(result: dict) -> None:
    print(
        f"{result['model']}: {result['steps']} steps, probes every {result['every']}, {result['repeats']} repeats, "
        "the plain and the monitored loop in lock-step"
    )
    interval = "too few repeats" if result["low"] is None else f"95% interval {result['low']:.4f}-{result['high']:.4f}"
    print(
        f"plain {result['off_ms']:.2f} ms/step  monitored {result['on_ms']:.2f} ms/step  ratio {result['ratio']:.4f} "
        f"({interval}; mean over repeats of monitored / plain loop time, bootstrap over repeats)"
    )
    print(f"each repeat's ratio: {result['ratios']} (the warm-up repeat, left out: {result['warm_up_ratio']})")
    print(
        f"in-call ratio {result['in_calls_ratio']:.4f} (1 + time inside the monitor's calls / the rest of the "
        "monitored loop)"
    )
    if result["sender_cpu_share"] is not None:
        print(
            f"sender process: {100 * result['sender_cpu_share']:.1f}% of the monitored loop's time in CPU, "
            "on another core (MLflow's store calls)"
        )
    print(
        f"once per run: attach {result['attach_s']:.2f} s (FLOP count, calibration, run), "
        f"close {result['close_s']:.2f} s"
    )
