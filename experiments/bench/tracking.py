"""``bench tracking``: the same short run with probes+tracking off and on, alternated.

The on/off ratio of the training loop's time per step: per-step medians over the runs of each
mode, summed, with a bootstrap interval (``timing.per_step_ratio``); also whole loops' wall and
CPU time per step, median over pairs with a 95% interval. Pairs go on (up to a limit) until the
ratio's interval is within ``--within`` (1%), and it says when it is not.
Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

from experiments import config_path
from experiments.bench.timing import alternated, interval_text, per_step_ratio, ratio_stats, say_resolved


def bench_tracking(
    config: str,
    overrides: list[str] | None,
    repeats: int,
    steps: int | None = None,
    max_repeats: int | None = None,
    within: float = 0.01,
) -> dict:
    """The same short run with probes and tracking off and on, alternated, ``repeats`` pairs at
    least (more, up to ``max_repeats``, until the on/off ratio's 95% interval is within
    ``within``). The ratio: every loop iteration's wall time (step, probe, log line, checkpoint:
    ``TrainResult.step_s``), its median over the runs of each mode, summed
    (:func:`per_step_ratio`, bootstrap interval). Also per run: the loop's wall and CPU time per
    step (``loop_s``, ``loop_cpu_s``), their on/off ratio over pairs; set-up and the end-of-run
    probe and uploads are outside the loop and reported apart."""
    from core.config import load_config
    from core.train import train

    cfg_on = load_config(config_path(config), [*(overrides or []), *([f"train.steps={steps}"] if steps else [])])
    cfg_off = cfg_on.model_copy(deep=True)
    cfg_off.probe.enabled = False
    n_steps = cfg_on.train.steps
    max_repeats = max(repeats, max_repeats or repeats)
    runs: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": [], "total": []} for m in ("off", "on")}
    per_step: dict[str, list[list[float]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        r = 0
        while r < repeats or (
            r < max_repeats and not per_step_ratio(per_step["on"], per_step["off"], within)["resolved"]
        ):
            for mode in alternated(r, "off", "on"):
                print(f"bench tracking: repeat {r + 1}, tracking {mode}", file=sys.stderr)
                started = time.perf_counter()
                result = (
                    train(cfg_off, track=False, progress=False)
                    if mode == "off"
                    else train(cfg_on, tracking_uri=uri, progress=False)
                )
                runs[mode]["total"].append(time.perf_counter() - started)
                runs[mode]["wall"].append(result.loop_s / n_steps)
                runs[mode]["cpu"].append(result.loop_cpu_s / n_steps)
                per_step[mode].append(result.step_s)
            r += 1
    steps_ratio = per_step_ratio(per_step["on"], per_step["off"], within)
    wall = ratio_stats(runs["on"]["wall"], runs["off"]["wall"], within)
    cpu = ratio_stats(runs["on"]["cpu"], runs["off"]["cpu"], within)
    ms = {m: {k: [round(v * 1000, 3) for v in vals] for k, vals in d.items() if k != "total"} for m, d in runs.items()}
    return {
        "steps": n_steps,
        "probe_every": cfg_on.probe.every,
        "checkpoint_every": cfg_on.train.checkpoint_every,
        "repeats": r,
        "within": within,
        "off_ms": round(statistics.median(runs["off"]["wall"]) * 1000, 3),
        "on_ms": round(statistics.median(runs["on"]["wall"]) * 1000, 3),
        "ratio": steps_ratio["ratio"],
        "low": steps_ratio["low"],
        "high": steps_ratio["high"],
        "resolved": steps_ratio["resolved"],
        "step_off_ms": round(sum(statistics.median(c) for c in zip(*per_step["off"])) * 1000 / n_steps, 3),
        "step_on_ms": round(sum(statistics.median(c) for c in zip(*per_step["on"])) * 1000 / n_steps, 3),
        "run_ratio": wall["ratio"],
        "run_low": wall["low"],
        "run_high": wall["high"],
        "cpu_ratio": cpu["ratio"],
        "cpu_low": cpu["low"],
        "cpu_high": cpu["high"],
        "cpu_resolved": cpu["resolved"],
        "outside_loop_s": {
            m: round(statistics.median(runs[m]["total"]) - statistics.median(runs[m]["wall"]) * n_steps, 2)
            for m in ("off", "on")
        },
        "off_all_ms": ms["off"]["wall"],
        "on_all_ms": ms["on"]["wall"],
        "off_all_cpu_ms": ms["off"]["cpu"],
        "on_all_cpu_ms": ms["on"]["cpu"],
    }


def print_tracking(result: dict) -> None:
    print(
        f"{result['steps']} steps, probe.every {result['probe_every']}, checkpoint_every "
        f"{result['checkpoint_every']}, {result['repeats']} alternated pairs of runs"
    )
    print(
        f"loop iteration (step, probe, log line, checkpoint), median over runs per step: off "
        f"{result['step_off_ms']:.2f} ms, on {result['step_on_ms']:.2f} ms"
    )
    steps = {"ratio": result["ratio"], "low": result["low"], "high": result["high"]}
    print(f"on / off, summed per-step medians [95% bootstrap interval over runs]: {interval_text(steps)}")
    print(say_resolved(result["resolved"], result["within"], "ratio", "--max-repeats"))
    wall = {"ratio": result["run_ratio"], "low": result["run_low"], "high": result["run_high"]}
    cpu = {"ratio": result["cpu_ratio"], "low": result["cpu_low"], "high": result["cpu_high"]}
    print(
        f"whole loops (off {result['off_ms']:.2f}, on {result['on_ms']:.2f} ms/step), on / off median over "
        f"pairs [95% interval]: wall {interval_text(wall)}, CPU {interval_text(cpu)} (swings with load)"
    )
    print(
        f"outside the loop (set-up; end-of-run probe, uploads): off {result['outside_loop_s']['off']:.2f} s, "
        f"on {result['outside_loop_s']['on']:.2f} s per run"
    )
    print(f"each run (ms/step): off {result['off_all_ms']}  on {result['on_all_ms']}")
