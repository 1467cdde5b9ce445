"""``python -m experiments evaluate`` on a tiny real run: metrics land in the run; bad input exits 2."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from core.config import ExperimentConfig
from core.train import train
from experiments.evaluate import evaluate_run, load_run_encoder, random_init_baseline
from tests.helpers import run_cli

HEADLINE = {"eval/digit/acc", "eval/direction/acc", "eval/depth/absrel", "eval/depth/delta1"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[str, str]:
    """(run id, tracking uri) of a finished 6-step MAE run with checkpoints at steps 3 and 6."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('eval')}/mlflow.db"
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"depth": 2, "dim": 24, "heads": 2, "decoder_dim": 16, "decoder_heads": 2},
            "data": {"frames": 4, "size": 16, "train_clips": 32, "val_clips": 16},
            "probe": {"every": 3, "batch_size": 8, "tokens_per_clip": 4},
            "train": {"steps": 6, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 3},
        }
    )
    return train(cfg, tracking_uri=uri, progress=False).run_id, uri


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


@pytest.mark.system
def test_evaluate_logs_eval_metrics_into_the_run(tiny_run):
    run_id, uri = tiny_run
    res = run_cli("-m", "experiments", "evaluate", "--run", run_id, "--tracking-uri", uri, "--per-block")
    assert res.returncode == 0, res.stderr
    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(run_id).data.metrics
    assert HEADLINE <= set(logged)
    assert {"eval/digit/block_00/acc", "eval/digit/block_01/acc", "eval/depth/block_01/delta1"} <= set(logged)
    assert _history(uri, run_id, "eval/digit/acc")[0][0] == 6  # at the run's final step
    assert 0.0 <= logged["eval/digit/acc"] <= 1.0 and logged["eval/depth/absrel"] > 0
    assert client.get_run(run_id).info.status == "FINISHED"  # attaching did not reopen the run
    table = res.stdout
    assert "digit" in table and "chance" in table and "0.100" in table  # 10-way chance level


def test_evaluate_python_api_and_random_baseline(tiny_run):
    run_id, uri = tiny_run
    out = evaluate_run(run_id, tasks=["digit"], tracking_uri=uri, log=False, progress=False)
    assert set(out) == {"eval/digit/acc"}
    _, cfg, step = load_run_encoder(run_id, uri)
    assert step == cfg.train.steps == 6
    base = random_init_baseline(cfg, tasks=["digit", "depth"], progress=False)
    assert set(base) == {"eval/digit/acc", "eval/depth/absrel", "eval/depth/delta1"}


@pytest.mark.system
@pytest.mark.parametrize("case", ["unknown_run", "unknown_task"])
def test_bad_input_exits_2_with_one_line(tiny_run, case):
    run_id, uri = tiny_run
    args = {"unknown_run": ["--run", "0" * 32], "unknown_task": ["--run", run_id, "--tasks", "digit,colour"]}[case]
    res = run_cli("-m", "experiments", "evaluate", *args, "--tracking-uri", uri)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.stderr
    if case == "unknown_task":
        assert "colour" in lines[0] and "digit, direction, depth" in lines[0]
