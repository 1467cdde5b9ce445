"""Seeds as groups: group_name, parse_seeds, and ``pretrain --seeds`` against a temporary store."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from core.config import ExperimentConfig, group_name
from core.errors import LayerLockError
from experiments.seeds import parse_seeds, seed_config
from tests.helpers import run_cli, tiny_dict, tiny_sets


def test_group_name_ignores_seed_and_run_name_only() -> None:
    cfg = ExperimentConfig.model_validate(tiny_dict())
    name = group_name(cfg)
    assert name.startswith("pixel-moving_digits-") and len(name.rsplit("-", 1)[1]) == 8
    assert group_name(seed_config(cfg, 7)) == name
    named = cfg.model_copy(deep=True)
    named.tracking.run_name = "mine"
    assert group_name(named) == name and seed_config(named, 3).tracking.run_name == "mine-seed3"
    other = cfg.model_copy(deep=True)
    other.train.lr = 1e-4
    assert group_name(other) != name
    assert group_name(ExperimentConfig.model_validate(tiny_dict(objective={"name": "layerlock"}))).startswith(
        "layerlock-moving_digits-"
    )


def test_parse_seeds() -> None:
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds(" 5, 3 ") == [5, 3]
    for text, needle in (
        ("", "empty"),
        (" , ", "empty"),
        ("0,x", "integers"),
        ("1.5", "integers"),
        ("0,,1", "integers"),
        ("1,2,1", "repeats 1"),
    ):
        with pytest.raises(LayerLockError, match=needle):
            parse_seeds(text)


@pytest.mark.system
def test_pretrain_seeds_share_a_group(store: str) -> None:
    proc = run_cli(
        "-m",
        "experiments",
        "pretrain",
        "--config",
        "experiments/configs/mae_tiny.yaml",
        *tiny_sets(**{"train.steps": 4, "probe.every": 2}),
        "--seeds",
        "3,5",
        "--tracking-uri",
        store,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_ids = proc.stdout.strip().splitlines()
    assert len(run_ids) == 2 and len(set(run_ids)) == 2
    client = MlflowClient(store)
    runs = [client.get_run(r) for r in run_ids]
    groups = {r.data.tags["layerlock.group"] for r in runs}
    assert len(groups) == 1
    (group,) = groups
    assert group.startswith("pixel-moving_digits-") and f"group {group}" in proc.stderr
    assert [r.data.params["train.seed"] for r in runs] == ["3", "5"]
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.system
def test_pretrain_seeds_bad_input_exit_2(store: str) -> None:
    base = ["-m", "experiments", "pretrain", "--config", "experiments/configs/mae_tiny.yaml", "--tracking-uri", store]
    for extra, needle in (
        (["--seeds", "0,x"], "comma-separated integers"),
        (["--seeds", "0,1", "--set", "train.seed=4"], "--seeds and --set train.seed"),
    ):
        proc = run_cli(*base, *extra)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
