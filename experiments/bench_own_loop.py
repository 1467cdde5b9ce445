"""``bench monitor|own-freezing``: the public API on the README example's torchvision models.

monitor: the example's plain loop with and without ``LayerMonitor`` (probes every ``--every``
steps, gradient metrics every 25, MLflow logging to sqlite), two copies of the model stepped in
lock-step so that the machine's drifts fall on both; attaching (FLOP count, calibration, run
creation) and closing (final probe, artifacts) are one-off costs, reported apart.
own-freezing: for k = 0..n-1 blocks frozen with ``freeze_prefix``, the median step time on one
batch, rounds interleaved across k, against the counted FLOP model; then a schedule derived from
a monitored run of the same loop, applied with ``apply_schedule``: the loop with it against
without it (alternated), beside the FLOP model's prediction and the one ``analysis schedule``
makes from the monitored run's ``time_model.json`` (its calibrated step times). On a busy machine whole-run wall
times swing by tens of percent, so the time ratio sums, per stage, the median step time times
the stage's steps (the wall ratio is printed too).
Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time


def _fresh(setup, initial: dict) -> None:
    """The setup's model back at its initial weights, nothing frozen."""
    from core.freezing import freeze_prefix

    freeze_prefix(setup.blocks, 0, stem=setup.stem)
    setup.model.load_state_dict(initial)


def _step_seconds(setup, steps: int, **kwargs) -> list[float]:
    """Run the example's loop; the seconds of each step (start of one step to the start of the next)."""
    from experiments.examples.own_loop import train

    starts: list[float] = []
    train(setup, steps, on_step=lambda _step: starts.append(time.perf_counter()), **kwargs)
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts, starts[1:])]


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
    import numpy as np

    from experiments.examples.own_loop import SETUPS, attach_monitor, make_optimizer, open_run, train_step

    plain, watched = SETUPS[model](), SETUPS[model]()
    initial = {k: v.clone() for k, v in plain.model.state_dict().items()}
    for s in (plain, watched):   # warm-up: first-call costs (allocator, lazy inits) are no loop's
        opt = make_optimizer(s)
        for step in range(min(steps, 10)):
            train_step(s, step, steps, opt)
    ratios, in_calls, sender_cpu, attach_s, close_s = [], [], [], [], []
    plain_ms, watched_ms = [], []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        for r in range(repeats + 1):
            print(f"bench monitor: {model}, " + (f"repeat {r}/{repeats}" if r else "warm-up repeat"), file=sys.stderr)
            _fresh(plain, initial)
            _fresh(watched, initial)
            t0 = time.perf_counter()
            writer = open_run(uri, f"bench-{model}")
            monitor = attach_monitor(watched, steps, every, writer=writer)
            writer.flush()   # the run's params, tags and models sent: a one-off cost, not the loop's
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
                for i in ((0, 1) if step % 2 == 0 else (1, 0)):
                    s, opt, mon = loops[i]
                    t0 = time.perf_counter()
                    train_step(s, step, steps, opt, monitor=mon)
                    times[i].append(time.perf_counter() - t0)
            writer.flush()   # what the loop logged, sent: the sender's CPU for it is counted
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
    ratio = float(np.mean(ratios))
    low = high = None
    if repeats >= 3:
        rng = np.random.default_rng(0)
        boots = [float(np.mean(rng.choice(ratios, size=len(ratios)))) for _ in range(2000)]
        low, high = (round(float(v), 4) for v in np.percentile(boots, [2.5, 97.5]))
    return {"model": model, "steps": steps, "every": every, "repeats": repeats,
            "off_ms": round(statistics.median(plain_ms), 3), "on_ms": round(statistics.median(watched_ms), 3),
            "ratio": round(ratio, 4), "low": low, "high": high,
            "in_calls_ratio": round(1 + statistics.median(in_calls), 4),
            "sender_cpu_share": round(statistics.median(sender_cpu), 4) if sender_cpu else None,
            "attach_s": round(statistics.median(attach_s), 3), "close_s": round(statistics.median(close_s), 3),
            "ratios": [round(v, 4) for v in ratios], "warm_up_ratio": round(warm_up, 4),
            "off_all_ms": [round(v, 3) for v in plain_ms], "on_all_ms": [round(v, 3) for v in watched_ms]}


DEFAULT_STEPS = {"vit": 300, "video": 200}   # the README example's runs


def bench_own_freezing(model: str, rounds: int, steps_per_round: int, warmup: int, repeats: int,
                       every: int, steps: int | None = None, max_rounds: int | None = None,
                       within: float = 0.01) -> dict:
    import torch.nn.functional as F

    from analysis.flops import stage_segments
    from analysis.schedule import derive_run_schedule
    from core.flops import count_flop_model
    from core.freezing import FreezeSchedule, freeze_prefix
    from experiments.bench import freezing_rows, interleaved_timings
    from experiments.examples.own_loop import SETUPS, attach_monitor, batch_at, make_optimizer, open_run, train

    setup = SETUPS[model]()
    initial = {k: v.clone() for k, v in setup.model.state_dict().items()}
    n = len(setup.blocks)
    x, y = batch_at(setup, 0)
    optimizer = make_optimizer(setup)

    def step() -> None:
        F.cross_entropy(setup.model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = count_flop_model(setup.blocks, lambda: F.cross_entropy(setup.model(x), y), model=setup.model,
                             stem=setup.stem)["per_step"]
    timings = interleaved_timings(n, lambda k: freeze_prefix(setup.blocks, k, optimizer, stem=setup.stem), step,
                                  rounds, steps_per_round, warmup, max_rounds, within, f"bench own-freezing {model}")
    rows = freezing_rows(timings, [flops[str(k)] for k in range(n)], within)

    # A schedule derived from a monitored run of the same loop, applied in it.
    total = steps or DEFAULT_STEPS[model]
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        _fresh(setup, initial)
        print(f"bench own-freezing: {model}, monitored run of {total} steps to derive a schedule", file=sys.stderr)
        with open_run(uri) as writer, attach_monitor(setup, total, every, writer=writer) as monitor:
            train(setup, total, monitor=monitor)
        derived = derive_run_schedule(monitor.run_id, uri)
    schedule = FreezeSchedule.from_dict(derived)
    segments = stage_segments(derived, total)
    wall: dict[str, list[float]] = {"plain": [], "schedule": []}
    by_stage: dict[str, list[float]] = {"plain": [], "schedule": []}
    for r in range(repeats):
        for mode in (("plain", "schedule") if r % 2 == 0 else ("schedule", "plain")):
            print(f"bench own-freezing: {model}, repeat {r + 1}/{repeats}, {mode}", file=sys.stderr)
            _fresh(setup, initial)
            step_s = _step_seconds(setup, total, schedule=schedule if mode == "schedule" else None)
            wall[mode].append(sum(step_s))
            # Robust to a busy machine: per stage, the median step time times its length.
            by_stage[mode].append(sum((stop - start) * statistics.median(step_s[start:stop])
                                      for start, stop, _ in segments))
    wall_ratio = statistics.median(wall["schedule"]) / statistics.median(wall["plain"])
    stage_ratio = statistics.median(by_stage["schedule"]) / statistics.median(by_stage["plain"])
    flop_ratio = 1.0 - derived["predicted_flop_saving"]
    time_pred = None if derived.get("predicted_time_saving") is None else 1.0 - derived["predicted_time_saving"]
    return {"model": model, "per_k": rows,
            "schedule": {"steps": total, "stages": derived["stages"], "repeats": repeats,
                         "plain_s": round(statistics.median(wall["plain"]), 3),
                         "schedule_s": round(statistics.median(wall["schedule"]), 3),
                         "wall_ratio": round(wall_ratio, 4), "time_ratio": round(stage_ratio, 4),
                         "flop_ratio": round(flop_ratio, 4), "time_vs_flop": round(stage_ratio / flop_ratio, 4),
                         "predicted_time_ratio": None if time_pred is None else round(time_pred, 4),
                         "predicted_time_basis": derived.get("predicted_time_basis"),
                         "time_vs_predicted": None if time_pred is None else round(stage_ratio / time_pred, 4),
                         "plain_all_s": [round(v, 3) for v in wall["plain"]],
                         "schedule_all_s": [round(v, 3) for v in wall["schedule"]]}}


def print_monitor(result: dict) -> None:
    print(f"{result['model']}: {result['steps']} steps, probes every {result['every']}, {result['repeats']} repeats, "
          "the plain and the monitored loop in lock-step")
    interval = "too few repeats" if result["low"] is None else f"95% interval {result['low']:.4f}-{result['high']:.4f}"
    print(f"plain {result['off_ms']:.2f} ms/step  monitored {result['on_ms']:.2f} ms/step  ratio {result['ratio']:.4f} "
          f"({interval}; mean over repeats of monitored / plain loop time, bootstrap over repeats)")
    print(f"each repeat's ratio: {result['ratios']} (the warm-up repeat, left out: {result['warm_up_ratio']})")
    print(f"in-call ratio {result['in_calls_ratio']:.4f} (1 + time inside the monitor's calls / the rest of the "
          "monitored loop)")
    if result["sender_cpu_share"] is not None:
        print(f"sender process: {100 * result['sender_cpu_share']:.1f}% of the monitored loop's time in CPU, "
              "on another core (MLflow's store calls)")
    print(f"once per run: attach {result['attach_s']:.2f} s (FLOP count, calibration, run), "
          f"close {result['close_s']:.2f} s")


def _interval_text(row: dict) -> str:
    from experiments.bench import _interval_text as text

    return text({"ratio": row["time_ratio"], "low": row["time_low"], "high": row["time_high"]})


def print_own_freezing(result: dict) -> None:
    print(f"{result['model']}: freeze_prefix on its {len(result['per_k'])} blocks")
    print(f"{'frozen':>6} {'step_ms':>9} {'GFLOP':>8} {'time/k0 [95% interval]':>24} {'flops/k0':>9} "
          f"{'time/flops':>10}")
    for r in result["per_k"]:
        print(f"{r['frozen']:>6} {r['step_ms']:>9.2f} {r['flops'] / 1e9:>8.3f} {_interval_text(r):>24} "
              f"{r['flop_ratio']:>9.3f} {r['time_vs_flop']:>10.3f}")
    s = result["schedule"]
    stages = ", ".join(f"{st['frozen']}@{st['step']}" for st in s["stages"]) or "none"
    print(f"derived schedule (frozen@step: {stages}) over {s['steps']} steps, {s['repeats']} runs each:")
    print(f"  time ratio {s['time_ratio']:.3f} (per stage: median step time x its steps), FLOP ratio "
          f"{s['flop_ratio']:.3f}, time/FLOPs {s['time_vs_flop']:.3f}")
    if s["predicted_time_ratio"] is not None:
        print(f"  predicted by `analysis schedule` from the monitored run ({s['predicted_time_basis']}): time ratio "
              f"{s['predicted_time_ratio']:.3f}, measured/predicted {s['time_vs_predicted']:.3f}")
    print(f"  wall {s['schedule_s']:.2f} s vs {s['plain_s']:.2f} s plain (ratio {s['wall_ratio']:.3f}); each run: "
          f"schedule {s['schedule_all_s']}, plain {s['plain_all_s']}")
