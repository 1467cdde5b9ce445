"""The time model (core.timemodel) on synthetic step timings: no clock is read here."""

from __future__ import annotations

import math
import random

import pytest

from core.errors import LayerLockError
from core.timemodel import (
    StepTimer,
    calibration_stages,
    median_interval,
    predicted_time_saving,
    resolves,
    time_table,
    within_run_saving,
)

FLOPS = {k: 10.0 - k for k in range(8)}  # stage k costs 10 - k FLOP units; k=0: 10


def affine(k: int, a: float = 3.0, b: float = 0.7) -> float:
    """A step of ``a`` seconds freezing cannot shrink plus ``b`` seconds per FLOP unit."""
    return a + b * FLOPS[k]


def timer_with(
    training: dict[int, list[float]] | None = None,
    calibration: dict[int, list[float]] | None = None,
    extra_per_step: float = 0.0,
    cpu: bool = False,
) -> StepTimer:
    """``cpu``: the same times on the CPU clock too."""
    t = StepTimer()
    for k, xs in (training or {}).items():
        for x in xs:
            t.add(k, x, x + extra_per_step, *((x, x + extra_per_step) if cpu else ()))
    for k, xs in (calibration or {}).items():
        for x in xs:
            t.add_calibration(k, x, x if cpu else None)
    return t


def segments(stages: list[tuple[int, int]], total: int) -> list[tuple[int, int, int]]:
    bounds = [0, *[s for s, _ in stages], total]
    ks = [0, *[k for _, k in stages]]
    return [(a, b, k) for a, b, k in zip(bounds, bounds[1:], ks) if b > a]


# ----------------------------------------------------------------------------- statistics


def test_median_interval_uses_order_statistics() -> None:
    assert median_interval([3, 1, 2]) == (2, None, None)  # too few for 95%
    med, lo, hi = median_interval(range(1, 11))  # n=10: [x_2, x_9] covers 97.9%
    assert (med, lo, hi) == (5.5, 2, 9)
    med, lo, hi = median_interval([5.0] * 6)
    assert med == lo == hi == 5.0
    with pytest.raises(ValueError):
        median_interval([])


def test_median_interval_covers_the_true_median() -> None:
    rng = random.Random(0)
    misses = 0
    for _ in range(400):
        xs = [rng.expovariate(1.0) for _ in range(15)]
        _, lo, hi = median_interval(xs)
        misses += not lo <= math.log(2) <= hi
    assert misses / 400 < 0.06  # nominal 95% (exact coverage at n=15: 96.5%)


def test_resolves_compares_half_width_with_the_target() -> None:
    assert resolves(0.99, 1.01, 1.0, within=0.01)
    assert not resolves(0.98, 1.02, 1.0, within=0.01)
    assert not resolves(None, None, 1.0, within=0.5)


# ----------------------------------------------------------------------------- recording


def test_timer_summaries_and_overhead() -> None:
    timer = timer_with(training={0: [1.0, 1.0, 1.2, 1.0], 2: [0.8, 0.8, 0.8]}, extra_per_step=0.1)
    tm = timer.to_dict(FLOPS, batch_size=4)
    assert tm["batch_size"] == 4 and set(tm["training"]) == {"0", "2"}
    assert tm["training"]["0"]["median_s"] == 1.0 and tm["training"]["0"]["steps"] == 4
    # overhead = probe time per step (whole step - step without probes), not the outlier 1.2
    assert tm["overhead_s_per_step"] == pytest.approx(0.1)
    assert tm["total_steps"] == 7 and tm["total_s"] == pytest.approx(4.2 + 2.4 + 0.7)
    restored = StepTimer()
    restored.load_state_dict(timer.state_dict())
    assert restored.to_dict(FLOPS) == timer.to_dict(FLOPS)


def test_calibration_stages() -> None:
    assert calibration_stages([], depth=8) == [0, 7]  # no schedule: both ends
    assert calibration_stages([2, 2, 5], depth=8) == [0, 2, 5]
    assert calibration_stages([], depth=1) == [0]


# ----------------------------------------------------------------------------- prediction


def test_measured_stages_give_the_exact_saving() -> None:
    tm = timer_with(training={k: [affine(k)] * 5 for k in (0, 3, 6)}).to_dict(FLOPS)
    table = time_table(tm)
    assert table.source[3] == "training" and table.source[1] == "affine fit"
    assert table.intercept == pytest.approx(3.0 / affine(0))  # the unshrinkable share of a k=0 step
    sched = segments([(100, 3), (200, 6)], 300)
    want = 1 - sum((b - a) * affine(k) for a, b, k in sched) / (300 * affine(0))
    assert predicted_time_saving(sched, 300, table) == pytest.approx(want)
    # the FLOP prediction is more optimistic: it assumes the unshrinkable part shrinks too
    flop_saving = 1 - sum((b - a) * FLOPS[k] for a, b, k in sched) / (300 * FLOPS[0])
    assert flop_saving > want


def test_unmeasured_stages_come_from_the_affine_flop_fit() -> None:
    # The MAE run of the demo: k=0 from training, k=0 and k=7 from the start-up calibration.
    tm = timer_with(training={0: [affine(0)] * 50}, calibration={0: [affine(0)] * 3, 7: [affine(7)] * 3}).to_dict(FLOPS)
    table = time_table(tm)
    assert [table.source[k] for k in (0, 4, 7)] == ["training", "affine fit", "calibration"]
    for k in range(8):
        assert table.ratio[k] == pytest.approx(affine(k) / affine(0))


def test_calibration_and_training_ratios_are_not_mixed() -> None:
    # Training ran on a busier machine (twice as slow) than the calibration: the ratio of a k
    # measured in calibration only is taken against the calibration's own k=0.
    calibration = {0: [affine(0)] * 3, 5: [affine(5)] * 3}
    tm = timer_with(training={0: [2 * affine(0)] * 9}, calibration=calibration).to_dict(FLOPS)
    assert time_table(tm).ratio[5] == pytest.approx(affine(5) / affine(0))


def test_a_monitors_calibration_gets_the_loops_own_time_added() -> None:
    # A framework's loop (data loading, its callbacks) costs 4 s a step on top of the model's step,
    # at every k; the monitor's calibration times the model's step only (calibration_step says so).
    loop = 4.0
    calibration = {0: [affine(0)] * 3, 5: [affine(5)] * 3}
    tm = timer_with(training={0: [affine(0) + loop] * 9}, calibration=calibration).to_dict(
        FLOPS, calibration_step="forward, loss, backward on the fixed batch of train_step"
    )
    table = time_table(tm)
    assert table.source[5] == "calibration"
    assert table.ratio[5] == pytest.approx((affine(5) + loop) / (affine(0) + loop))
    assert table.ratio[5] > affine(5) / affine(0)  # the loop's part does not shrink: less saved
    # on the CPU clock too (the flag sits at the top level of time_model.json)
    cpu = timer_with(training={0: [affine(0) + loop] * 9}, calibration=calibration, cpu=True).to_dict(
        FLOPS, calibration_step="forward"
    )
    assert time_table(cpu, clock="cpu").ratio[5] == pytest.approx((affine(5) + loop) / (affine(0) + loop))
    # a calibration slower than training (a busier moment) adds nothing
    slow = timer_with(training={0: [affine(0)] * 9}, calibration={k: [2 * v[0]] * 3 for k, v in calibration.items()})
    assert time_table(slow.to_dict(FLOPS, calibration_step="forward")).ratio[5] == pytest.approx(affine(5) / affine(0))


def test_one_measured_stage_falls_back_to_flops() -> None:
    tm = timer_with(training={0: [1.0] * 4}).to_dict(FLOPS)
    table = time_table(tm)
    assert table.source[5] == "flops" and table.ratio[5] == pytest.approx(FLOPS[5] / FLOPS[0])
    assert "proportional to counted FLOPs" in table.describe()


def test_overhead_dilutes_the_saving() -> None:
    """Probes cost the same at every stage, so they shrink the relative saving."""
    plain = timer_with(training={0: [1.0] * 5, 4: [0.5] * 5}).to_dict(FLOPS)
    probed = timer_with(training={0: [1.0] * 5, 4: [0.5] * 5}, extra_per_step=0.25).to_dict(FLOPS)
    sched = segments([(0, 4)], 100)
    assert predicted_time_saving(sched, 100, time_table(plain)) == pytest.approx(0.5)
    assert predicted_time_saving(sched, 100, time_table(probed)) == pytest.approx(0.5 / 1.25)


def test_noisy_synthetic_timings_predict_within_a_point() -> None:
    """Measured with 5% noise per step, the predicted saving is within 1 point of the truth."""
    rng = random.Random(1)

    def noisy(k: int, n: int) -> list[float]:
        return [affine(k) * rng.lognormvariate(0, 0.05) for _ in range(n)]

    tm = timer_with(training={0: noisy(0, 300)}, calibration={0: noisy(0, 3), 7: noisy(7, 3)}).to_dict(FLOPS)
    sched = segments([(60, 2), (120, 4), (180, 6)], 300)
    truth = 1 - sum((b - a) * affine(k) for a, b, k in sched) / (300 * affine(0))
    assert abs(predicted_time_saving(sched, 300, time_table(tm)) - truth) < 0.01


def test_bad_time_models_raise_one_clear_error() -> None:
    with pytest.raises(LayerLockError, match="k=0"):
        time_table(timer_with(training={3: [1.0] * 3}).to_dict(FLOPS))
    with pytest.raises(LayerLockError, match="expected a JSON object"):
        time_table([1, 2])
    with pytest.raises(LayerLockError, match="FLOPs per stage"):
        time_table({"training": {"0": {"median_s": 1.0, "n": 3}}, "flops_per_step": {}})
    with pytest.raises(LayerLockError, match="median_s and n"):
        time_table({"training": {"0": {"median": 1.0}}, "flops_per_step": FLOPS})
    table = time_table(timer_with(training={0: [1.0] * 3}).to_dict({0: 2.0, 1: 1.0}))
    with pytest.raises(LayerLockError, match="no entry for stage 4"):
        predicted_time_saving([(0, 10, 4)], 10, table)


def test_cpu_clock_predicts_from_its_own_record() -> None:
    """On a busy machine wall times of k=0 and k=4 can be taken at different loads; the CPU record
    is read on its own, with its own k=0."""
    timer = StepTimer()
    for wall, cpu in ((2.0, 1.0), (2.2, 1.0), (1.8, 1.0)):
        timer.add(0, wall, wall, cpu, cpu)
    for _ in range(3):
        timer.add(4, 0.5, 0.5, 0.6, 0.6)  # a quieter moment: wall ratio 0.25, CPU ratio 0.6
    tm = timer.to_dict(FLOPS)
    sched = segments([(0, 4)], 10)
    assert predicted_time_saving(sched, 10, time_table(tm)) == pytest.approx(0.75)
    assert predicted_time_saving(sched, 10, time_table(tm, clock="cpu")) == pytest.approx(0.4)
    with pytest.raises(LayerLockError, match="no CPU-time record"):
        time_table(timer_with(training={0: [1.0] * 3}).to_dict(FLOPS), clock="cpu")


def test_within_run_saving_measures_the_run_against_its_own_unfrozen_pace() -> None:
    timer = StepTimer()
    for k, n in ((0, 60), (3, 40)):  # 60 unfrozen steps of 1.0 s, 40 frozen ones of 0.7 s, probes 0.1 s/step
        for _ in range(n):
            timer.add(k, affine(k, a=0.0, b=0.1), affine(k, a=0.0, b=0.1) + 0.1)
    tm = timer.to_dict(FLOPS)
    assert within_run_saving(tm) == pytest.approx(1 - (60 * 1.1 + 40 * 0.8) / (100 * 1.1))
    own = predicted_time_saving([(0, 60, 0), (60, 100, 3)], 100, time_table(tm))
    assert within_run_saving(tm) == pytest.approx(own)  # steps at their medians: the same number
    slow = StepTimer()  # a slow outlier among the unfrozen steps counts in its mean, as in the total
    for k, step in ((0, 1.0), (0, 1.0), (0, 4.0), (3, 0.5), (3, 0.5), (3, 0.5)):
        slow.add(k, step, step)
    assert within_run_saving(slow.to_dict(FLOPS)) == pytest.approx(1 - 7.5 / (6 * 2.0))
    assert within_run_saving(timer_with(training={3: [1.0] * 3}).to_dict(FLOPS)) is None  # no unfrozen steps
    assert within_run_saving(tm, clock="cpu") is None  # no CPU record


def test_median_interval_of_a_long_run_does_not_overflow() -> None:
    """A run keeps up to MAX_SAMPLES step times per stage; past 1023 of them the Binomial(n, 1/2)
    tail no longer fits 2.0 ** n. The interval is the normal approximation's: n/2 +- 1.96 sqrt(n)/2."""
    from core.timemodel import MAX_SAMPLES

    med, lo, hi = median_interval(range(MAX_SAMPLES))
    half = 1.96 * MAX_SAMPLES**0.5 / 2
    assert med == (MAX_SAMPLES - 1) / 2
    assert abs((med - lo) - half) <= 2 and abs((hi - med) - half) <= 2
