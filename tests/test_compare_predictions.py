"""``analysis compare`` puts the wall saving a scheduled run was predicted to save (before it ran,
from its schedule's source run) beside the one measured. Synthetic runs, numbers known by hand:
the MAE run's time model says half of a step cannot shrink, its FLOPs say all of it can."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import io
from analysis.__main__ import main
from analysis.compare import COMPARE_PARTS, compare_runs, prediction_lines
from analysis.testing import create_run_from_frames, synthetic_flop_model, synthetic_time_model

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
STEPS = 10
MODEL = synthetic_flop_model(4, block_forward=1.0, other=0.0)  # 12, 10, 8, 6 FLOP per step
SCHEDULE = {"n_blocks": 4, "stages": [{"step": 2, "frozen": 1}, {"step": 6, "frozen": 3}], "source": {}}
FLOP_SAVING = 1 - (2 * 12 + 4 * 10 + 4 * 6) / 120


def history(wall_per_step: float) -> pd.DataFrame:
    return pd.DataFrame(
        {"step": [STEPS - 1] * 2, "metric": ["train/loss", "train/wall_s"], "value": [1.0, wall_per_step * STEPS]}
    )


def test_scheduled_runs_show_predicted_against_measured(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = {"uri": uri, "artifact_root": (tmp_path / "artifacts").as_uri(), "params": {"train.steps": STEPS}}
    mae = create_run_from_frames(
        "layerlock",
        history=history(1.0),
        run_name="mae",
        tags={io.TAG_METHOD: "mae"},
        json_artifacts={
            io.FLOP_MODEL_ARTIFACT: MODEL,
            io.TIME_MODEL_ARTIFACT: synthetic_time_model(MODEL, step_s=1.0, unshrinkable=0.5),
        },
        **common,
    )
    scheduled = {io.SCHEDULE_ARTIFACT: SCHEDULE, io.FLOP_MODEL_ARTIFACT: MODEL}
    freeze_only = create_run_from_frames(
        "layerlock",
        history=history(0.85),
        run_name="freeze_only",
        json_artifacts=scheduled,
        tags={io.TAG_METHOD: "mae", io.TAG_SCHEDULE_SOURCE: mae},
        **common,
    )
    own_times = synthetic_time_model(
        MODEL, step_s=1.0, unshrinkable=0.25, measured=(0, 1, 3), trained={0: 2, 1: 4, 3: 4}
    )  # SCHEDULE's stages
    layerlock = create_run_from_frames(  # another method: its own models, measured while it trained
        "layerlock",
        history=history(1.1),
        run_name="layerlock",
        json_artifacts={**scheduled, io.TIME_MODEL_ARTIFACT: own_times},
        tags={io.TAG_METHOD: "layerlock", io.TAG_SCHEDULE_SOURCE: mae},
        **common,
    )

    frame = compare_runs(io.load_runs([mae, freeze_only, layerlock], uri, COMPARE_PARTS).values()).set_index("run_id")
    assert pd.isna(frame.loc[mae, "predicted_wall_saving"])  # no schedule, nothing predicted
    assert frame.loc[freeze_only, "predicted_wall_saving"] == pytest.approx(FLOP_SAVING / 2)
    assert frame.loc[freeze_only, "predicted_flop_saving"] == pytest.approx(FLOP_SAVING)
    assert frame.loc[freeze_only, "predicted_from"] == f"source {mae[:8]}: time_model"
    assert frame.loc[freeze_only, "wall_saving"] == pytest.approx(0.15)
    assert frame.loc[layerlock, "predicted_from"] == f"own {layerlock[:8]}: time_model"
    # its own time model: the saving its frozen steps made against its own unfrozen ones
    assert frame.loc[layerlock, "wall_saving_within_run"] == pytest.approx(0.75 * FLOP_SAVING)
    lines = prediction_lines(frame.reset_index())
    assert len(lines) == 3 and "freeze_only" in lines[1] and "+1.7 pts" in lines[1]  # 15.0% against 13.3%
    assert "20.0%" in lines[2]  # layerlock's within-run saving
    assert pd.isna(frame.loc[freeze_only, "wall_saving_within_run"])  # it has no time model of its own

    assert main(["compare", mae, freeze_only, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "predicted before they ran, and measured" in out and "time_model" in out
