"""``bench integrations``: the framework callbacks on models nobody here wrote.

1. *Schedule*: the HF example's ``VideoMAEForPreTraining`` trained as MAE with the callback
   (calibrated at k=0 and the deepest k), a schedule derived from that run (what ``layerlock
   schedule`` prints), then a run with that schedule (freezing only: the MAE run's time model
   knows nothing of the latent target's cost). Per stage: the step time measured in the
   scheduled run (its ``time_model.json``, training medians) against what the MAE run's
   ``time_model.json`` predicted (``core.timemodel.time_table``: its own k=0 step times r(k)),
   as measured / predicted.
2. *Overhead*: each callback (HF ``Trainer``, Lightning) at ``--every`` (probe interval; gradient
   metrics every 25 steps) against the same run without it, the two runs in lock-step (one thread
   each, taking turns one step at a time, as ``bench monitor`` steps its two loops), timed over
   whole probe periods (attach and close are one-off costs, left out); per repeat the ratio of
   the loops' times, their mean with a 95% bootstrap interval over repeats.

Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

from core.timemodel import median_interval
from experiments.bench.timing import LockStep, mean_ratio_interval

SKIP = 5  # warm-up steps of every loop, not timed
WARM = 30  # a k=0 stage shorter than this is the run's start-up
LOG_EVERY = 25  # the callbacks' gradient metrics and loss rows, as in ``bench monitor``


def bench_schedule(steps: int, tmp: Path) -> dict[str, Any]:
    """The derived schedule's step time per stage against the MAE run's time-model prediction."""
    from analysis import io
    from core.timemodel import time_table
    from experiments.examples import hf_videomae as hf

    uri = f"sqlite:///{tmp}/schedule.db"
    print("bench integrations: MAE run (calibrated)", file=sys.stderr)
    mae = hf.train(tmp / "mae", steps, tracking_uri=uri, every=10, calibration=5)
    schedule, derived = hf.derive(mae["run_id"], uri, steps), True
    if not schedule["stages"]:  # nothing converged this early: freeze half the blocks from mid-run
        schedule, derived = {"n_blocks": 4, "stages": [{"step": steps // 2, "frozen": 2}]}, False
    print(f"bench integrations: scheduled run {schedule['stages']}", file=sys.stderr)
    run = hf.train(tmp / "scheduled", steps, schedule=schedule, tracking_uri=uri, every=10)
    predicted = time_table(io.load_time_model(mae["run_id"], uri), io.load_flop_model(mae["run_id"], uri))
    measured_tm = io.load_time_model(run["run_id"], uri)
    train = {int(k): v for k, v in (measured_tm.get("training") or {}).items()}
    first = min(s["step"] for s in schedule["stages"])
    rows = []
    for k in sorted(train):
        s = train[k]
        # predicted: the MAE run's own k=0 step (its training median) times r(k); measured: the
        # scheduled run's median at stage k. A k=0 stage shorter than WARM steps is the run's
        # start (first calls, allocations) and says so: it is not what a prediction is about.
        p_ms = 1000 * predicted.step_s * predicted.ratio[k] if k < len(predicted.ratio) else None
        m_ms = 1000 * s["median_s"]
        rows.append(
            {
                "k": k,
                "n": s["n"],
                "measured_ms": round(m_ms, 3),
                "predicted_ms": None if p_ms is None else round(p_ms, 3),
                "predicted_r": None if k >= len(predicted.ratio) else round(predicted.ratio[k], 4),
                "source": predicted.source[k] if k < len(predicted.source) else None,
                "ratio": None if not p_ms else round(m_ms / p_ms, 4),
                "warm_up": k == 0 and first < WARM,
            }
        )
    return {
        "schedule": schedule["stages"],
        "derived": derived,
        "prediction": predicted.describe(),
        "calibration_step": io.load_time_model(mae["run_id"], uri).get("calibration_step"),
        "stages": rows,
    }


def _turn_taker(lock: LockStep, who: int, steps: int, pl: Any = None) -> Any:
    """A framework callback that makes its loop take turns in ``lock`` (the first callback of
    the loop: what the other callbacks do in a step falls inside the loop's turn)."""
    if pl is None:
        from transformers import TrainerCallback

        class HFTurns(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                lock.step_begins(who, state.global_step)

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= steps:
                    lock.loop_ends(who, steps)

        return HFTurns()

    class PLTurns(pl.Callback):
        def on_train_batch_start(self, trainer, *args: Any) -> None:
            lock.step_begins(who, trainer.global_step)

        def on_train_batch_end(self, trainer, *args: Any) -> None:
            if trainer.global_step >= steps:
                lock.loop_ends(who, steps)

    return PLTurns()


def _loop(
    framework: str, who: int, with_cb: bool, lock: LockStep, out: str, steps: int, uri: str, every: int, dim: int
) -> None:
    """One run of the framework's example (with or without LayerLock's callback), taking turns in
    ``lock``; the body of one of the two processes of a repeat (an error breaks the lock, so the
    other process stops too, and sets the exit code)."""
    import contextlib
    import os

    import torch

    torch.set_num_threads(1)
    try:
        # The frameworks print their logs on stdout: to stderr here, so that the bench's stdout is its result.
        with contextlib.redirect_stdout(sys.stderr):
            if framework == "hf":
                from experiments.examples import hf_videomae as hf

                hf.train(
                    Path(out),
                    steps,
                    tracking_uri=uri,
                    every=every,
                    callback=with_cb,
                    callbacks=[_turn_taker(lock, who, steps)],
                    log_every=LOG_EVERY,
                    dim=dim,
                )
            else:
                import lightning.pytorch as pl

                from experiments.examples import lightning_timm as lt

                lt.train(
                    Path(out),
                    steps,
                    tracking_uri=uri,
                    every=every,
                    callback=with_cb,
                    mlflow_logger=True,
                    extra_callbacks=[_turn_taker(lock, who, steps, pl)],
                    log_every=LOG_EVERY,
                )
    except BaseException:
        lock.fail()
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def bench_overhead(framework: str, periods: int, every: int, repeats: int, tmp: Path, dim: int = 32) -> dict[str, Any]:
    """Per repeat, the example run with and without the callback in lock-step (:class:`LockStep`,
    one process each: the frameworks keep process-wide state; the first turn alternating between
    repeats), timed over ``periods`` whole probe periods (``periods * every`` steps, so exactly
    ``periods`` probes fall in the timed steps) after ``SKIP`` warm-up steps; the ratio of the two
    loops' times (with / without). A first repeat warms up (the store's tables, first calls) and
    is reported apart."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    # one store per loop: two processes creating one sqlite file's tables and experiment would race
    uris = [f"sqlite:///{tmp}/{framework}-{who}.db" for who in (0, 1)]
    timed = periods * every
    steps = SKIP + timed + 1
    ratios, on_ms, off_ms, warm_up = [], [], [], None
    for r in range(repeats + 1):
        label = f"repeat {r}/{repeats}" if r else "warm-up repeat"
        print(f"bench integrations: {framework} {label}, {steps} steps each, in lock-step", file=sys.stderr)
        lock = LockStep(SKIP, timed, ctx=ctx)
        lock.turn = r % 2  # which loop takes the first turn: the one with the callback every other repeat
        procs = [
            ctx.Process(
                target=_loop,
                args=(
                    framework,
                    who,
                    who == 0,
                    lock,
                    str(tmp / f"{framework}-{r}-{who}"),
                    steps,
                    uris[who],
                    every,
                    dim,
                ),
            )
            for who in (0, 1)  # loop 0: with the callback
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(
                f"bench integrations: a {framework} loop failed (exit codes {[p.exitcode for p in procs]}; "
                "its traceback is above)"
            )
        if lock.steps != [timed, timed]:
            raise RuntimeError(f"bench integrations: timed {lock.steps} steps, expected {timed} in each loop")
        ratio = lock.spent[0] / lock.spent[1]
        if r == 0:
            warm_up = round(ratio, 4)
            continue
        ratios.append(ratio)
        on_ms.append(1000 * lock.spent[0] / timed)
        off_ms.append(1000 * lock.spent[1] / timed)
    summary = mean_ratio_interval(ratios)
    return {
        "framework": framework,
        "steps": steps,
        "timed_steps": timed,
        "every": every,
        "log_every": LOG_EVERY,
        "repeats": repeats,
        **summary,
        "median_repeat": round(median_interval(ratios)[0], 4),
        "warm_up_ratio": warm_up,
        "ratios": [round(x, 4) for x in ratios],
        "on_ms": round(median_interval(on_ms)[0], 3),
        "off_ms": round(median_interval(off_ms)[0], 3),
    }


def bench_integrations(
    steps: int, every: int, repeats: int, periods: int = 4, parts: tuple = ("schedule", "hf", "lightning")
) -> dict:
    """``steps``: each run of the schedule part; ``periods``: probe periods timed per overhead loop."""
    out: dict[str, Any] = {}
    # The frameworks print their logs on stdout: to stderr here, so that stdout is the result (--json).
    with tempfile.TemporaryDirectory(prefix="bench-integrations-") as tmp, contextlib.redirect_stdout(sys.stderr):
        if "schedule" in parts:
            out["schedule"] = bench_schedule(steps, Path(tmp))
        out["overhead"] = [
            bench_overhead(fw, periods, every, repeats, Path(tmp)) for fw in ("hf", "lightning") if fw in parts
        ]
    return out


def print_integrations(result: dict[str, Any]) -> None:
    """The result, after the machine line (``experiments.bench._show`` prints it first)."""
    if "schedule" in result:
        s = result["schedule"]
        print(
            f"HF VideoMAE, schedule {'derived from the MAE run' if s['derived'] else 'fixed (nothing converged)'}: "
            f"{s['schedule']}; prediction: {s['prediction']}"
        )
        print(f"  calibration step: {s.get('calibration_step')}")
        print(
            "  k     n  measured ms  predicted ms  predicted r  measured/predicted  (predicted = MAE run's t(0) x r(k))"
        )
        for r in s["stages"]:
            pm = "-" if r["predicted_ms"] is None else f"{r['predicted_ms']:.2f}"
            pr = "-" if r["predicted_r"] is None else f"{r['predicted_r']:.4f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.4f}"
            note = "; the run's first steps (start-up), not a prediction's" if r.get("warm_up") else ""
            print(
                f"  {r['k']}  {r['n']:>4}  {r['measured_ms']:>11.2f}  {pm:>12}  {pr:>11}  {ratio:>18}  "
                f"({r['source']}{note})"
            )
    for o in result.get("overhead", []):
        interval = "too few repeats" if o["low"] is None else f"95% interval {o['low']:.4f}-{o['high']:.4f}"
        print(
            f"{o['framework']} callback overhead at every={o['every']} (gradient metrics every {o['log_every']}): "
            f"{o['timed_steps']} steps timed of {o['steps']}, with and without in lock-step, {o['repeats']} repeats; "
            f"without {o['off_ms']:.2f} ms/step, with {o['on_ms']:.2f} ms/step, "
            f"ratio {o['ratio']:.4f} ({interval}; mean of per-repeat ratios, bootstrap)"
        )
        print(f"  each repeat's ratio: {o['ratios']} (warm-up repeat, left out: {o['warm_up_ratio']})")
