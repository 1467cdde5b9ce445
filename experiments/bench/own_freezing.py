"""``bench own-freezing``: freezing in the README example's loop, on its torchvision models.

For k = 0..n-1 blocks frozen with ``freeze_prefix``, the median step time on one batch, rounds
interleaved across k (``timing.interleaved_timings``), against the counted FLOP model; then a
schedule derived from a monitored run of the same loop, applied with ``apply_schedule``: the
loop with it against without it (alternated), beside the FLOP model's prediction and the one
``analysis schedule`` makes from the monitored run's ``time_model.json`` (its calibrated step
times). On a busy machine whole-run wall times swing by tens of percent, so the time ratio sums,
per stage, the median step time times the stage's steps (the wall ratio is printed too).
Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

import statistics
import sys
import tempfile

from experiments.bench.own_loop import DEFAULT_STEPS, fresh, step_seconds
from experiments.bench.timing import alternated, freezing_rows, interleaved_timings, interval_text


def bench_own_freezing(
    model: str,
    rounds: int,
    steps_per_round: int,
    warmup: int,
    repeats: int,
    every: int,
    steps: int | None = None,
    max_rounds: int | None = None,
    within: float = 0.01,
) -> dict:
    import torch.nn.functional as F

    from analysis import io
    from analysis.flops import stage_segments
    from analysis.schedule import derive_run_schedule, schedule_parts
    from core.flops import count_flop_model
    from core.freezing import FreezeSchedule, freeze_prefix
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

    flops = count_flop_model(
        setup.blocks, lambda: F.cross_entropy(setup.model(x), y), model=setup.model, stem=setup.stem
    )["per_step"]
    timings = interleaved_timings(
        n,
        lambda k: freeze_prefix(setup.blocks, k, optimizer, stem=setup.stem),
        step,
        rounds,
        steps_per_round,
        warmup,
        max_rounds,
        within,
        f"bench own-freezing {model}",
    )
    rows = freezing_rows(timings, [flops[str(k)] for k in range(n)], within)

    # A schedule derived from a monitored run of the same loop, applied in it.
    total = steps or DEFAULT_STEPS[model]
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        fresh(setup, initial)
        print(f"bench own-freezing: {model}, monitored run of {total} steps to derive a schedule", file=sys.stderr)
        with open_run(uri) as writer, attach_monitor(setup, total, every, writer=writer) as monitor:
            train(setup, total, monitor=monitor)
        derived = derive_run_schedule(io.load_run(monitor.run_id, uri, schedule_parts()))
    schedule = FreezeSchedule.from_dict(derived)
    segments = stage_segments(derived, total)
    wall: dict[str, list[float]] = {"plain": [], "schedule": []}
    by_stage: dict[str, list[float]] = {"plain": [], "schedule": []}
    for r in range(repeats):
        for mode in alternated(r, "plain", "schedule"):
            print(f"bench own-freezing: {model}, repeat {r + 1}/{repeats}, {mode}", file=sys.stderr)
            fresh(setup, initial)
            step_s = step_seconds(setup, total, schedule=schedule if mode == "schedule" else None)
            wall[mode].append(sum(step_s))
            # Robust to a busy machine: per stage, the median step time times its length.
            by_stage[mode].append(
                sum((stop - start) * statistics.median(step_s[start:stop]) for start, stop, _ in segments)
            )
    wall_ratio = statistics.median(wall["schedule"]) / statistics.median(wall["plain"])
    stage_ratio = statistics.median(by_stage["schedule"]) / statistics.median(by_stage["plain"])
    flop_ratio = 1.0 - derived["predicted_flop_saving"]
    time_pred = None if derived.get("predicted_time_saving") is None else 1.0 - derived["predicted_time_saving"]
    return {
        "model": model,
        "per_k": rows,
        "schedule": {
            "steps": total,
            "stages": derived["stages"],
            "repeats": repeats,
            "plain_s": round(statistics.median(wall["plain"]), 3),
            "schedule_s": round(statistics.median(wall["schedule"]), 3),
            "wall_ratio": round(wall_ratio, 4),
            "time_ratio": round(stage_ratio, 4),
            "flop_ratio": round(flop_ratio, 4),
            "time_vs_flop": round(stage_ratio / flop_ratio, 4),
            "predicted_time_ratio": None if time_pred is None else round(time_pred, 4),
            "predicted_time_basis": derived.get("predicted_time_basis"),
            "time_vs_predicted": None if time_pred is None else round(stage_ratio / time_pred, 4),
            "plain_all_s": [round(v, 3) for v in wall["plain"]],
            "schedule_all_s": [round(v, 3) for v in wall["schedule"]],
        },
    }


def _interval_text(row: dict) -> str:
    return interval_text({"ratio": row["time_ratio"], "low": row["time_low"], "high": row["time_high"]})


def print_own_freezing(result: dict) -> None:
    print(f"{result['model']}: freeze_prefix on its {len(result['per_k'])} blocks")
    print(
        f"{'frozen':>6} {'step_ms':>9} {'GFLOP':>8} {'time/k0 [95% interval]':>24} {'flops/k0':>9} {'time/flops':>10}"
    )
    for r in result["per_k"]:
        print(
            f"{r['frozen']:>6} {r['step_ms']:>9.2f} {r['flops'] / 1e9:>8.3f} {_interval_text(r):>24} "
            f"{r['flop_ratio']:>9.3f} {r['time_vs_flop']:>10.3f}"
        )
    s = result["schedule"]
    stages = ", ".join(f"{st['frozen']}@{st['step']}" for st in s["stages"]) or "none"
    print(f"derived schedule (frozen@step: {stages}) over {s['steps']} steps, {s['repeats']} runs each:")
    print(
        f"  time ratio {s['time_ratio']:.3f} (per stage: median step time x its steps), FLOP ratio "
        f"{s['flop_ratio']:.3f}, time/FLOPs {s['time_vs_flop']:.3f}"
    )
    if s["predicted_time_ratio"] is not None:
        print(
            f"  predicted by `analysis schedule` from the monitored run ({s['predicted_time_basis']}): time ratio "
            f"{s['predicted_time_ratio']:.3f}, measured/predicted {s['time_vs_predicted']:.3f}"
        )
    print(
        f"  wall {s['schedule_s']:.2f} s vs {s['plain_s']:.2f} s plain (ratio {s['wall_ratio']:.3f}); each run: "
        f"schedule {s['schedule_all_s']}, plain {s['plain_all_s']}"
    )
