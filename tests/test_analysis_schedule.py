"""Schedules: validation, derivation from convergence, frozen curves and FLOP predictions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.convergence import posthoc_convergence
from analysis.flops import per_step_flops, predicted_saving, schedule_flops
from analysis.schedule import (
    derive_schedule,
    frozen_at,
    frozen_curve,
    schedule_with_prediction,
    validate_schedule,
)
from analysis.testing import synthetic_flop_model, synthetic_layer_metrics, synthetic_time_model
from core.errors import LayerLockError, ScheduleError

TRUTH = [120, 180, 260, 330, 410, 470, None, 200]  # block 6 never converges; block 7 would


def conv_series(values: list[int | None]) -> pd.Series:
    return pd.Series(pd.array(values, dtype="Int64"), index=pd.RangeIndex(len(values), name="block"))


def assert_never_early(schedule: dict, conv: pd.Series, margin: int = 0) -> None:
    """Every block inside a frozen prefix converged at least `margin` steps before the stage."""
    for stage in schedule["stages"]:
        for block in range(stage["frozen"]):
            assert not pd.isna(conv[block])
            assert conv[block] + margin <= stage["step"], (stage, block)


# ----------------------------------------------------------------------------- validate

GOOD = {"n_blocks": 4, "stages": [{"step": 0, "frozen": 1}, {"step": 10, "frozen": 1}, {"step": 20, "frozen": 3}]}


def test_validate_accepts_and_normalises() -> None:
    out = validate_schedule({**GOOD, "predicted_flop_saving": 0.2}, total_steps=21, n_blocks=4)
    assert out["stages"] == GOOD["stages"] and out["source"] == {} and out["predicted_flop_saving"] == 0.2
    assert validate_schedule({"n_blocks": 1, "stages": []})["stages"] == []
    assert validate_schedule({"n_blocks": 2, "stages": [{"step": np.int64(5), "frozen": np.int64(1)}]})["stages"] == [
        {"step": 5, "frozen": 1}
    ]


def stages(*pairs: tuple) -> list[dict]:
    return [{"step": s, "frozen": f} for s, f in pairs]


@pytest.mark.parametrize(
    ("schedule", "kwargs", "message"),
    [
        ([], {}, "expected a JSON object"),
        ({"stages": []}, {}, "missing key 'n_blocks'"),
        ({"n_blocks": 4}, {}, "missing key 'stages'"),
        ({"n_blocks": 0, "stages": []}, {}, "n_blocks must be a positive integer"),
        ({"n_blocks": "4", "stages": []}, {}, "n_blocks must be a positive integer"),
        ({"n_blocks": 4, "stages": {}}, {}, "stages must be a list"),
        ({"n_blocks": 4, "stages": [[10, 1]]}, {}, r"stages\[0\] must be an object"),
        ({"n_blocks": 4, "stages": [{"step": 10}]}, {}, r"stages\[0\] is missing 'frozen'"),
        ({"n_blocks": 4, "stages": stages((1.5, 1))}, {}, r"stages\[0\].step must be an integer"),
        ({"n_blocks": 4, "stages": stages(("10", 1))}, {}, r"stages\[0\].step must be an integer"),
        ({"n_blocks": 4, "stages": stages((10, True))}, {}, r"stages\[0\].frozen must be an integer"),
        ({"n_blocks": 4, "stages": stages((-1, 1))}, {}, r"stages\[0\].step=-1 is negative"),
        ({"n_blocks": 4, "stages": stages((1, -1))}, {}, r"stages\[0\].frozen=-1 is negative"),
        ({"n_blocks": 4, "stages": stages((10, 1), (10, 2))}, {}, "strictly increase"),
        ({"n_blocks": 4, "stages": stages((10, 1), (5, 2))}, {}, "strictly increase"),
        ({"n_blocks": 4, "stages": stages((10, 2), (20, 1))}, {}, "cannot unfreeze"),
        ({"n_blocks": 4, "stages": stages((10, 4))}, {}, "leaves no block trainable"),
        ({"n_blocks": 4, "stages": stages((10, 1), (300, 2))}, {"total_steps": 300}, "at or after the end"),
        ({"n_blocks": 4, "stages": [{"step": 1, "frozen": 1, "when": 2}]}, {}, "unknown key"),
        ({"n_blocks": 4, "stages": [], "source": "x"}, {}, "source must be an object"),
        (GOOD, {"n_blocks": 8}, "does not match"),
    ],
)
def test_validate_rejects(schedule: object, kwargs: dict, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        validate_schedule(schedule, **kwargs)


# ----------------------------------------------------------------------------- derive


def test_derive_from_detected_convergence_never_freezes_early() -> None:
    layer_df = synthetic_layer_metrics(TRUTH, total_steps=600, probe_every=50, seed=3)
    conv = posthoc_convergence(layer_df)
    schedule = derive_schedule(conv, n_blocks=len(TRUTH), total_steps=600, source={"run_id": "r"})
    validate_schedule(schedule, total_steps=600, n_blocks=len(TRUTH))
    assert_never_early(schedule, conv)
    # Derivation stops at block 6 (never converged) even though block 7 converged.
    assert schedule["stages"][-1]["frozen"] == 6
    # Each stage sits exactly at the latest convergence step of its prefix.
    for stage in schedule["stages"]:
        assert stage["step"] == int(conv[: stage["frozen"]].max())
    assert schedule["source"]["run_id"] == "r" and schedule["source"]["margin"] == 0


def test_derive_margin_cap_quantize_merge_and_horizon() -> None:
    conv = conv_series([100, 50, 200, 260, 330])
    # k=1 and k=2 are both ready at max(100, 50) = 100: one stage with the larger prefix.
    assert derive_schedule(conv, 5, 1000)["stages"] == stages((100, 2), (200, 3), (260, 4))
    # The hard cap is n_blocks-1 = 4 even when all five converged and max_frozen asks for more.
    assert derive_schedule(conv, 5, 1000, max_frozen=9)["stages"][-1]["frozen"] == 4
    capped = derive_schedule(conv, 5, 1000, max_frozen=2)
    assert capped["stages"] == stages((100, 2))
    with_margin = derive_schedule(conv, 5, 1000, margin=25)
    assert with_margin["stages"] == stages((125, 2), (225, 3), (285, 4))
    assert_never_early(with_margin, conv, margin=25)
    # Quantize rounds UP (never earlier than allowed): 100->100, 200->200, 260->300.
    assert derive_schedule(conv, 5, 1000, quantize=100)["stages"] == stages((100, 2), (200, 3), (300, 4))
    # Stages at or after the end are dropped.
    assert derive_schedule(conv, 5, 260)["stages"] == stages((100, 2), (200, 3))
    # A block missing from the series counts as never converged.
    assert derive_schedule(conv_series([100, 200]), 5, 1000)["stages"] == stages((100, 1), (200, 2))
    assert derive_schedule(conv_series([None, 100]), 5, 1000)["stages"] == []


@pytest.mark.parametrize(
    "kwargs",
    [{"margin": -1}, {"margin": 0.5}, {"quantize": 0}, {"max_frozen": -1}, {"total_steps": 0}, {"n_blocks": 0}],
)
def test_derive_rejects_bad_arguments(kwargs: dict) -> None:
    args = {"conv": conv_series([10]), "n_blocks": 3, "total_steps": 100, **kwargs}
    with pytest.raises(ScheduleError):
        derive_schedule(**args)


def test_frozen_at_and_curve_agree() -> None:
    schedule = validate_schedule({"n_blocks": 4, "stages": stages((2, 1), (5, 3))})
    curve = frozen_curve(schedule, 8)
    assert curve.tolist() == [0, 0, 1, 1, 1, 3, 3, 3]
    assert [frozen_at(schedule, s) for s in range(8)] == curve.tolist()
    assert frozen_curve({"n_blocks": 2, "stages": []}, 3).tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------- FLOPs

SMALL_MODEL = {"n_blocks": 4, "batch_size": 2, "objective": "pixel", "per_step": {"0": 10, "1": 8, "2": 6, "3": 4}}


def test_predicted_saving_by_hand() -> None:
    schedule = {"n_blocks": 4, "stages": stages((2, 1), (5, 3))}
    # 10 steps: steps 0-1 unfrozen 2 x 10 = 20; steps 2-4 (k=1) 3 x 8 = 24; steps 5-9 (k=3) 5 x 4 = 20.
    # Total 64 against 10 x 10 = 100 unfrozen: saving 1 - 64/100 = 0.36.
    assert schedule_flops(schedule, SMALL_MODEL, 10) == pytest.approx(64.0)
    assert predicted_saving(schedule, SMALL_MODEL, 10) == pytest.approx(0.36)
    # A horizon shorter than the last stage: steps 0-1 at 10, steps 2-3 at 8 -> 36 of 40, saving 0.1.
    assert predicted_saving(schedule, SMALL_MODEL, 4) == pytest.approx(0.1)
    assert predicted_saving({"n_blocks": 4, "stages": []}, SMALL_MODEL, 10) == 0.0

    out = schedule_with_prediction(schedule, SMALL_MODEL, 10)
    assert out["predicted_flop_saving"] == pytest.approx(0.36)
    assert out["predicted_time_saving"] == pytest.approx(0.36)  # no time model: proportional to FLOPs
    assert out["predicted_time_basis"] == "flops" and "no time_model.json" in out["prediction"]["time_model"]
    assert out["prediction"]["flops"] == pytest.approx(64.0)
    json.dumps(out)
    validate_schedule(json.loads(json.dumps(out)), total_steps=10)  # the CLI output is itself a schedule
    assert schedule_with_prediction(schedule, None, 10)["predicted_flop_saving"] is None


def test_flop_model_errors() -> None:
    with pytest.raises(LayerLockError, match="no entry for k=1"):
        per_step_flops({"per_step": {"0": 10, "2": 5}})
    with pytest.raises(LayerLockError, match="per_step"):
        per_step_flops({"n_blocks": 2})
    with pytest.raises(LayerLockError, match="no entry for 3 frozen"):
        schedule_flops({"n_blocks": 8, "stages": stages((1, 3))}, {"per_step": {"0": 1, "1": 1}}, 5)
    # The synthetic model saves two block-forwards per frozen block.
    model = synthetic_flop_model(4, block_forward=1.0, other=0.0)
    assert per_step_flops(model).tolist() == [12.0, 10.0, 8.0, 6.0]


def test_logged_saving_against_nothing_frozen() -> None:
    from analysis.flops import logged_saving

    model = {"n_blocks": 4, "per_step": {"0": 8.0, "1": 6.0, "2": 4.0, "3": 2.0}}
    assert logged_saving(60.0, 10, model) == pytest.approx(0.25)  # 60 of the 80 FLOPs unfrozen would cost
    assert logged_saving(None, 10, model) is None and logged_saving(60.0, 0, model) is None
    assert logged_saving(60.0, 10, None) is None
    assert logged_saving(60.0, 10, {"per_step": {}}) is None  # malformed: the number is hidden, nothing raised


def test_time_model_predicts_the_wall_saving() -> None:
    """With measured step times the wall prediction keeps the part freezing cannot shrink."""
    model = synthetic_flop_model(4, block_forward=1.0, other=0.0)  # per step: 12, 10, 8, 6
    schedule = {"n_blocks": 4, "stages": stages((2, 1), (6, 3))}
    tm = synthetic_time_model(model, step_s=1.0, unshrinkable=0.5)  # t(k) = 0.5 + 0.5 * flops(k) / 12
    out = schedule_with_prediction(schedule, model, 10, time_model=tm)
    flop_saving = 1 - (2 * 12 + 4 * 10 + 4 * 6) / 120
    assert out["predicted_flop_saving"] == pytest.approx(flop_saving)
    assert out["predicted_time_saving"] == pytest.approx(flop_saving / 2)  # half of each step cannot shrink
    assert out["predicted_time_basis"] == "time_model"
    assert "affine FLOP fit (unshrinkable share 50.0%)" in out["prediction"]["time_model"]
    # a run without a flop model still gets a time prediction from the time model's own FLOPs
    alone = schedule_with_prediction(schedule, None, 10, time_model=tm)
    assert alone["predicted_flop_saving"] is None and alone["predicted_time_saving"] == pytest.approx(flop_saving / 2)
    # an unusable time model is no error: FLOPs, and the note says why
    broken = schedule_with_prediction(schedule, model, 10, time_model={"training": {}, "flops_per_step": {"0": 1}})
    assert broken["predicted_time_basis"] == "flops" and "not usable" in broken["prediction"]["time_model"]
    assert broken["predicted_time_saving"] == pytest.approx(flop_saving)
    nothing = schedule_with_prediction(schedule, None, 10)
    assert nothing["predicted_time_saving"] is None and nothing["predicted_time_basis"] is None
