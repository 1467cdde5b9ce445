"""``bench monitor|own-freezing``: the public API on the README example's torchvision models.

monitor: the example's plain loop with and without ``LayerMonitor`` (probes every ``--every``
steps, gradient metrics every 25, MLflow logging), runs alternated; the time of the loop as the
sum over steps of each step's median over repeats (and the plain ratio of median run times);
attaching (FLOP count, run creation) and closing (final probe, artifacts) are one-off costs,
reported apart.
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


def bench_monitor(model: str, steps: int, every: int, repeats: int) -> dict:
    """Both loops do the same steps on the same data and weights, so step i of every run is the
    same work: the per-step median over repeats removes another process's burst from a step while
    keeping the monitor's cost (its probe and log steps come back in every repeat). Also measured
    within each monitored run: the time inside the monitor's calls against the rest of the loop
    (robust to load that changes between runs; MLflow's background sender and the probe-file writer
    not included), and each loop's CPU time over every thread."""
    from experiments.bench import per_step_ratio
    from experiments.examples.own_loop import SETUPS, attach_monitor

    setup = SETUPS[model]()
    initial = {k: v.clone() for k, v in setup.model.state_dict().items()}
    runs: dict[str, list[list[float]]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}   # the loop's CPU time, every thread (sender, writer)
    attach_s, close_s, in_calls = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        for r in range(repeats):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                print(f"bench monitor: {model}, repeat {r + 1}/{repeats}, monitor {mode}", file=sys.stderr)
                _fresh(setup, initial)
                monitor = None
                if mode == "on":
                    t0 = time.perf_counter()
                    monitor = attach_monitor(setup, steps, every, tracking_uri=uri, run_name=f"bench-{model}")
                    monitor.tracker.flush()   # the run's params, tags and models sent: a one-off cost, not the loop's
                    attach_s.append(time.perf_counter() - t0)
                spent = [0.0]
                if monitor is not None:
                    _timed(monitor, spent)
                c0 = time.process_time()
                runs[mode].append(_step_seconds(setup, steps, monitor=monitor))
                cpu[mode].append(time.process_time() - c0)
                if monitor is not None:
                    in_calls.append(spent[0] / (sum(runs[mode][-1]) - spent[0]))
                if monitor is not None:
                    t0 = time.perf_counter()
                    monitor.close()
                    close_s.append(time.perf_counter() - t0)
    per_step = {m: sum(statistics.median(col) for col in zip(*rs)) * 1000 / steps for m, rs in runs.items()}
    wall = {m: [sum(r) * 1000 / steps for r in rs] for m, rs in runs.items()}
    interval = per_step_ratio(runs["on"], runs["off"], within=0.01)
    return {"model": model, "steps": steps, "every": every, "repeats": repeats,
            "off_ms": round(per_step["off"], 3), "on_ms": round(per_step["on"], 3),
            "ratio": interval["ratio"], "low": interval["low"], "high": interval["high"],
            "cpu_ratio": round(statistics.median(cpu["on"]) / statistics.median(cpu["off"]), 4),
            "wall_ratio": round(statistics.median(wall["on"]) / statistics.median(wall["off"]), 4),
            "in_calls_ratio": round(1 + statistics.median(in_calls), 4),
            "attach_s": round(statistics.median(attach_s), 3), "close_s": round(statistics.median(close_s), 3),
            "off_all_ms": [round(v, 3) for v in wall["off"]], "on_all_ms": [round(v, 3) for v in wall["on"]]}


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
    from experiments.examples.own_loop import SETUPS, attach_monitor, batch_at, make_optimizer, train

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
        with attach_monitor(setup, total, every, tracking_uri=uri) as monitor:
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
    print(f"{result['model']}: {result['steps']} steps, probes every {result['every']}, "
          f"{result['repeats']} repeats each")
    interval = "too few repeats" if result["low"] is None else f"95% interval {result['low']:.3f}-{result['high']:.3f}"
    print(f"off_ms {result['off_ms']:.2f}  on_ms {result['on_ms']:.2f}  ratio {result['ratio']:.4f} ({interval}; "
          f"per step: median over repeats, bootstrap over runs)")
    print(f"CPU-time ratio {result['cpu_ratio']:.4f} (median run; every thread of the process: the monitor's "
          "writer and MLflow's sender included)")
    print(f"in-call ratio {result['in_calls_ratio']:.4f} (1 + time inside the monitor's calls / the rest of the "
          "loop, within each monitored run)")
    print(f"wall ratio {result['wall_ratio']:.4f} (median run); each run (ms/step): off {result['off_all_ms']}  "
          f"on {result['on_all_ms']}")
    print(f"once per run: attach {result['attach_s']:.2f} s (FLOP count, run), close {result['close_s']:.2f} s")


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
