"""``bench integrations``: the framework callbacks on models nobody here wrote.

1. *Schedule*: the HF example's ``VideoMAEForPreTraining`` trained as MAE with the callback
   (calibrated at k=0 and the deepest k), a schedule derived from that run (what ``layerlock
   schedule`` prints), then a run with that schedule (freezing only: the MAE run's time model
   knows nothing of the latent target's cost). Per stage: the step time measured in the
   scheduled run (its ``time_model.json``, training medians) against what the MAE run's
   ``time_model.json`` predicted (``core.timemodel.time_table``: r(k) = t(k) / t(0)), as
   measured r(k) / predicted r(k).
2. *Overhead*: each callback (HF ``Trainer``, Lightning) at ``--every`` (probe interval)
   against the same run without it, in interleaved repeats (order swapped every repeat), the
   steady-state loop timed by a callback of its own (attach and close are one-off costs, left
   out); the median of the per-repeat ratios with its 95% distribution-free interval
   (``core.timemodel.median_interval``).

Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from core.timemodel import median_interval


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
    t0 = train.get(0, {}).get("median_s")
    rows = []
    for k in sorted(train):
        s = train[k]
        r_meas = s["median_s"] / t0 if t0 else None
        r_pred = predicted.ratio[k] if k < len(predicted.ratio) else None
        rows.append(
            {
                "k": k,
                "n": s["n"],
                "measured_ms": round(1000 * s["median_s"], 3),
                "predicted_ms": round(1000 * predicted.step_s * r_pred, 3) if r_pred is not None else None,
                "measured_r": round(r_meas, 4) if r_meas is not None else None,
                "predicted_r": round(r_pred, 4) if r_pred is not None else None,
                "source": predicted.source[k] if k < len(predicted.source) else None,
                "ratio": round(r_meas / r_pred, 4) if r_meas is not None and r_pred else None,
            }
        )
    return {"schedule": schedule["stages"], "derived": derived, "prediction": predicted.describe(), "stages": rows}


def _loop_timer(pl: Any = None, skip: int = 5) -> Any:
    """A callback that times the loop from the end of step ``skip`` to the end of the last step."""
    if pl is None:
        from transformers import TrainerCallback

        class HFTimer(TrainerCallback):
            start = end = None
            steps = 0

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                if state.global_step == skip:
                    self.start = now
                elif state.global_step > skip:
                    self.end, self.steps = now, self.steps + 1

        return HFTimer()

    class PLTimer(pl.Callback):
        start = end = None
        steps = 0

        def on_train_batch_end(self, trainer, *args: Any) -> None:
            now = time.perf_counter()
            if trainer.global_step == skip:
                self.start = now
            elif trainer.global_step > skip:
                self.end, self.steps = now, self.steps + 1

    return PLTimer()


def bench_overhead(framework: str, steps: int, every: int, repeats: int, tmp: Path) -> dict[str, Any]:
    """Interleaved repeats of the example's run with and without the callback: per repeat, the
    ratio of the timed loops' per-step times (with / without)."""
    uri = f"sqlite:///{tmp}/{framework}.db"
    ratios, on_ms, off_ms = [], [], []
    for r in range(repeats):
        order = (True, False) if r % 2 == 0 else (False, True)
        per = {}
        for with_cb in order:
            print(f"bench integrations: {framework} repeat {r + 1}/{repeats}, callback {with_cb}", file=sys.stderr)
            if framework == "hf":
                from experiments.examples import hf_videomae as hf

                timer = _loop_timer()
                hf.train(
                    tmp / f"hf-{r}-{with_cb}", steps, tracking_uri=uri, every=every, callback=with_cb, callbacks=[timer]
                )
            else:
                import lightning.pytorch as pl

                from experiments.examples import lightning_timm as lt

                timer = _loop_timer(pl)
                lt.train(
                    tmp / f"pl-{r}-{with_cb}",
                    steps,
                    tracking_uri=uri,
                    every=every,
                    callback=with_cb,
                    mlflow_logger=True,
                    extra_callbacks=[timer],
                )
            per[with_cb] = (timer.end - timer.start) / timer.steps
        ratios.append(per[True] / per[False])
        on_ms.append(1000 * per[True])
        off_ms.append(1000 * per[False])
    med, low, high = median_interval(ratios)
    return {
        "framework": framework,
        "steps": steps,
        "every": every,
        "repeats": repeats,
        "ratio": round(med, 4),
        "low": None if low is None else round(low, 4),
        "high": None if high is None else round(high, 4),
        "ratios": [round(x, 4) for x in ratios],
        "on_ms": round(median_interval(on_ms)[0], 3),
        "off_ms": round(median_interval(off_ms)[0], 3),
    }


def bench_integrations(
    steps: int, every: int, repeats: int, overhead_steps: int, parts: tuple = ("schedule", "hf", "lightning")
) -> dict:
    out: dict[str, Any] = {}
    # The frameworks print their logs on stdout: to stderr here, so that stdout is the result (--json).
    with tempfile.TemporaryDirectory(prefix="bench-integrations-") as tmp, contextlib.redirect_stdout(sys.stderr):
        if "schedule" in parts:
            out["schedule"] = bench_schedule(steps, Path(tmp))
        out["overhead"] = [
            bench_overhead(fw, overhead_steps, every, repeats, Path(tmp)) for fw in ("hf", "lightning") if fw in parts
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
        print("  k     n  measured ms  predicted ms  measured r  predicted r  measured/predicted  (r = t(k)/t(0))")
        for r in s["stages"]:
            pm = "-" if r["predicted_ms"] is None else f"{r['predicted_ms']:.2f}"
            pr = "-" if r["predicted_r"] is None else f"{r['predicted_r']:.4f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.4f}"
            print(
                f"  {r['k']}  {r['n']:>4}  {r['measured_ms']:>11.2f}  {pm:>12}  {r['measured_r']:>10.4f}  "
                f"{pr:>11}  {ratio:>18}  ({r['source']})"
            )
    for o in result.get("overhead", []):
        interval = "too few repeats" if o["low"] is None else f"95% interval {o['low']:.4f}-{o['high']:.4f}"
        print(
            f"{o['framework']} callback overhead at every={o['every']}: {o['steps']} steps, {o['repeats']} repeats "
            f"interleaved; without {o['off_ms']:.2f} ms/step, with {o['on_ms']:.2f} ms/step, "
            f"ratio {o['ratio']:.4f} ({interval}; median of per-repeat ratios)"
        )
        print(f"  each repeat's ratio: {o['ratios']}")
