"""Freeze-test variants (issue 27): one frozen-set mechanism, what each variant freezes and saves,
the stem's own schedule, the group-scored tolerance, the ties report and the cost report."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import io
from analysis.agreement import (
    agreement_from_frames,
    format_report,
    format_variant_costs,
    freeze_test_ties,
    seed_noise,
    variant_costs,
)
from analysis.compare import FINAL_LOSS_PARTS, freeze_grid_from_frames
from analysis.testing import create_run_from_frames
from core import schema
from core.config import ExperimentConfig
from core.errors import ConfigError, LayerLockError, ScheduleError
from core.flops import count_step_flops, flop_model
from core.freezing import FreezeSchedule, FrozenSet, prefix_set, schedule_from_config, set_frozen
from core.masking import tube_mask
from core.model import build_model
from core.objectives import compute_losses
from core.train import build_optimizer, train
from experiments.cli import main as experiments_main
from experiments.freeze_test import variant_set
from tests.helpers import tiny_dict

DEPTH = 4  # the tiny config's


def _model():
    cfg = ExperimentConfig.model_validate(tiny_dict())
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.geometry)
    opt = build_optimizer(model, cfg)
    g = cfg.geometry
    video = torch.rand(4, 3, g.frames, g.size, g.size)
    keep, mask = tube_mask(4, g.grid, cfg.model.mask_ratio, torch.Generator().manual_seed(1))
    return cfg, model, opt, (video, keep, mask)


def _steps(cfg, model, opt, batch, n=3) -> None:
    for _ in range(n):
        compute_losses(model, model, *batch, cfg.objective)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _params(model, fs: FrozenSet):
    """(frozen, trainable) parameter lists of the encoder's stem and blocks under ``fs``."""
    frozen, free = [], []
    for i, blk in enumerate(model.blocks):
        (frozen if i in fs.blocks else free).extend(blk.parameters())
    (frozen if fs.stem else free).extend(model.patch_embed.parameters())
    return frozen, free


@pytest.mark.parametrize(
    ("variant", "x"),
    [("prefix", 2), ("stem", 0), ("prefix-no-stem", 2), ("block", 0), ("block", 2)],
)
def test_each_variant_freezes_exactly_its_parameters(variant, x) -> None:
    cfg, model, opt, batch = _model()
    _steps(cfg, model, opt, batch, 1)  # every parameter has Adam state now
    fs = variant_set(variant, x, DEPTH)
    set_frozen(model, opt, fs)
    frozen, free = _params(model, fs)
    assert frozen and all(p not in opt.state for p in frozen)
    before = [p.detach().clone() for p in frozen]
    free_before = [p.detach().clone() for p in free]
    _steps(cfg, model, opt, batch)
    assert all(torch.equal(a, p) for a, p in zip(before, frozen, strict=True))  # bitwise unchanged
    changed = [not torch.equal(a, p) for a, p in zip(free_before, free, strict=True)]
    assert sum(changed) >= len(changed) - 2  # every trainable tensor moves (a zero-init bias may not, once)
    # Whatever trains below the frozen set still gets a gradient through it.
    stem_moves = not torch.equal(free_before[-1], free[-1]) if not fs.stem else None
    if variant in ("prefix-no-stem", "block"):
        assert stem_moves, "the stem trains: gradients must flow through the frozen blocks to it"
    assert model.frozen_prefix == (fs.prefix if fs.stem else 0)


def test_the_prefix_variant_is_the_old_prefix() -> None:
    assert variant_set("prefix", 3, DEPTH) == prefix_set(3) == FrozenSet(frozenset({0, 1, 2}), True)
    assert variant_set("prefix-no-stem", 3, DEPTH) == FrozenSet(frozenset({0, 1, 2}), False)
    assert variant_set("stem", 0, DEPTH) == FrozenSet(frozenset(), True)
    assert variant_set("block", 3, DEPTH) == FrozenSet(frozenset({3}), False)


@pytest.mark.parametrize(
    ("variant", "x", "message"),
    [
        ("nosuch", 1, "unknown"),
        ("prefix", 4, "between 1 and 3"),
        ("prefix-no-stem", 0, "between 1 and 3"),
        ("block", 4, "between 0 and 3"),
        ("block", -1, "between 0 and 3"),
    ],
)
def test_bad_variant_inputs(variant, x, message) -> None:
    with pytest.raises(LayerLockError, match=message):
        variant_set(variant, x, DEPTH)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variant", "nosuch", "--steps", "4", "--blocks", "1"], "--variant nosuch: unknown"),
        (["--variant", "stem", "--steps", "4", "--blocks", "1"], "drop --blocks"),
        (["--variant", "block", "--steps", "4"], "needs --steps and --blocks"),
    ],
)
def test_freeze_test_command_rejects_bad_variants_with_one_line(argv, message, capsys, store) -> None:
    code = experiments_main(["freeze-test", "--baseline", "x", *argv, "--tracking-uri", store])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_counted_savings_are_honest() -> None:
    cfg = ExperimentConfig.model_validate(tiny_dict())

    def flops(fs: FrozenSet) -> int:
        return count_step_flops(cfg, 4, 0, fs)

    full = flops(FrozenSet())
    prefix2, no_stem2 = flops(variant_set("prefix", 2, DEPTH)), flops(variant_set("prefix-no-stem", 2, DEPTH))
    block1, stem = flops(variant_set("block", 1, DEPTH)), flops(variant_set("stem", 0, DEPTH))
    assert prefix2 == count_step_flops(cfg, 4, 2)  # the default: the old prefix count
    assert prefix2 < block1 < full  # a lone block saves only its weight gradients
    assert prefix2 < no_stem2 < full  # no stem: the input gradients still run through blocks 0, 1
    # Without the stem, blocks 0..1 save exactly the weight gradients a lone block saves, twice over.
    assert full - no_stem2 == pytest.approx(2 * (full - block1), rel=0.02)
    assert prefix2 < stem < full  # the stem alone: its weight gradient only (nothing is below it)
    # The stem is one linear map of the kept tubelets: its weight gradient is 2 x tokens x patch_dim x dim.
    g, m = cfg.geometry, cfg.model
    from core.masking import n_keep

    assert full - stem == 2 * 4 * n_keep(g.grid, m.mask_ratio) * g.patch_dim * m.dim


def test_stem_policy_in_the_flop_model_and_the_schedule() -> None:
    cfg = ExperimentConfig.model_validate(tiny_dict())
    with_first, never = flop_model(cfg, 4), flop_model(cfg, 4, stem="never")
    assert "stem" not in with_first and never["stem"] == "never"
    assert never["per_step"]["0"] == with_first["per_step"]["0"]
    for k in range(1, DEPTH):
        assert with_first["per_step"][str(k)] < never["per_step"][str(k)] < with_first["per_step"]["0"]
    last = flop_model(cfg, 4, stem="last", last_frozen=2)
    assert last["per_step"]["1"] == never["per_step"]["1"] and last["per_step"]["2"] == with_first["per_step"]["2"]
    assert prefix_set(2, "last", 3) == FrozenSet(frozenset({0, 1}), False)
    assert prefix_set(3, "last", 3) == FrozenSet(frozenset({0, 1, 2}), True)
    assert prefix_set(0, "with_first") == FrozenSet() and not prefix_set(2, "never").stem


def test_schedule_json_stem_field_round_trips_and_old_files_load(tmp_path) -> None:
    old = {"n_blocks": 4, "stages": [{"step": 2, "frozen": 1}, {"step": 6, "frozen": 3}]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = FreezeSchedule.load(path)
    assert loaded.stem == "with_first" and "stem" not in loaded.to_dict()  # old files read and write as before
    assert loaded.frozen_set_at(3) == FrozenSet(frozenset({0}), True)
    new = FreezeSchedule.from_dict({**old, "stem": "last"})
    again = FreezeSchedule.from_dict(json.loads(json.dumps(new.to_dict())))
    assert again == new and again.to_dict()["stem"] == "last"
    assert again.frozen_set_at(3) == FrozenSet(frozenset({0}), False)
    assert again.frozen_set_at(6) == FrozenSet(frozenset({0, 1, 2}), True)
    with pytest.raises(ScheduleError, match="stem must be one of"):
        FreezeSchedule.from_dict({**old, "stem": "sometimes"})
    # The config's freeze.stem overrides the file's field.
    cfg = ExperimentConfig.model_validate(tiny_dict(freeze={"schedule": str(path), "stem": "never"}))
    assert schedule_from_config(cfg.freeze, 4, 12).stem == "never"


def test_freeze_only_config_is_checked() -> None:
    with pytest.raises((ConfigError, ValueError), match="exclude each other"):
        ExperimentConfig.model_validate(
            tiny_dict(freeze={"schedule": [{"step": 1, "frozen": 1}], "only": {"step": 1, "blocks": [1]}})
        )


def test_trainer_counts_the_fixed_set_flops() -> None:
    cfg = ExperimentConfig.model_validate(
        tiny_dict(freeze={"only": {"step": 4, "blocks": [1], "stem": False}}, probe={"enabled": False})
    )
    result = train(cfg, track=False, progress=False)
    full = count_step_flops(cfg, cfg.train.batch_size, 0)
    alone = count_step_flops(cfg, cfg.train.batch_size, 0, FrozenSet(frozenset({1}), False))
    assert alone < full and result.flops == pytest.approx(4 * full + 8 * alone)


# ----------------------------------------------------------------------------- ties and costs


def test_ties_say_which_blocks_and_at_which_steps() -> None:
    # Every prefix passes at 300 and fails at 100: the freeze test ties blocks 0..5.
    rows = [(L, T, 1.0 if T == 300 else 1.05) for L in (2, 4, 6) for T in (100, 300)]
    children = pd.DataFrame(rows, columns=["freeze_blocks", "freeze_step", "final_loss"])
    grid = freeze_grid_from_frames(children, 1.0, tol=0.01)
    report = agreement_from_frames(grid, {"posthoc": pd.Series({b: 50 * b for b in range(8)})}, 8)
    assert report["ties"] == [
        {
            "step": 300,
            "status": "converged",
            "blocks": [0, 1, 2, 3, 4, 5],
            "prefixes": [2, 4, 6],
            "passed_at": [300],
            "failed_at": [100],
        }
    ]
    assert report["rules"]["posthoc"]["spearman_rho"] is None
    text = format_report({**report, "run_id": "r", "baseline_final_loss": 1.0, "tolerance": {"line": "tol"}})
    assert "freeze test ties blocks 0-5: all converged from T=300; rows L=2, 4, 6 pass at T=300; fail at T=100" in text
    assert "rank agreement undefined" in text
    truth_never = freeze_grid_from_frames(children.assign(final_loss=1.05), 1.0, tol=0.01)
    from analysis.agreement import freeze_test_steps

    ties = freeze_test_ties(truth_never, freeze_test_steps(truth_never, 8))
    assert ties[0]["step"] is None and ties[0]["status"] == "never" and ties[0]["failed_at"] == [100, 300]


def _loss(final: float) -> pd.DataFrame:
    return pd.DataFrame({"step": [0, 1, 2, 3], "metric": "train/loss", "value": [final + 1, final, final, final]})


@pytest.mark.system  # 12 logged runs: ~18 s on the shared machine
def test_variant_costs_over_seeds_with_intervals(store, tmp_path) -> None:
    common = {"uri": store, "artifact_root": (tmp_path / "a").as_uri()}
    baselines, costs = [], {"prefix": [0.05, 0.04, 0.06], "stem": [0.05, 0.05, 0.05], "block": [0.0, 0.01, -0.01]}
    for s, base in enumerate((1.0, 1.01, 0.99)):
        rid = create_run_from_frames("v", history=_loss(base), tags={schema.TAG_GROUP: "g"}, **common)
        baselines.append(rid)
        for variant, per in costs.items():
            tags = {
                schema.TAG_PARENT: rid,
                schema.TAG_METHOD: schema.METHOD_FREEZE_TEST,
                schema.TAG_FREEZE_STEP: "100",
                schema.TAG_FREEZE_BLOCKS: {"prefix": "2", "stem": "0", "block": "3"}[variant],
            }
            if variant != "prefix":  # an untagged child reads as prefix
                tags[schema.TAG_FREEZE_VARIANT] = variant
            create_run_from_frames("v", history=_loss(base * (1 + per[s])), tags=tags, **common)
    tests = [io.load_freeze_test(r, store, FINAL_LOSS_PARTS) for r in baselines]
    table = variant_costs(tests).set_index("variant")
    assert list(table.index) == ["prefix", "stem", "block"]
    assert table.loc["prefix", "cost"] == pytest.approx(0.05) and table.loc["prefix", "n"] == 3
    half = 4.302653 * 0.01 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert table.loc["prefix", "low"] == pytest.approx(0.05 - half, rel=1e-4)
    assert table.loc["stem", "high"] == pytest.approx(0.05) and table.loc["block", "cell"] == "block 3"
    noise = seed_noise(tests)
    assert noise[1] == 3 and noise[0] == pytest.approx(np.std([1.0, 1.01, 0.99], ddof=1) / 1.0)
    text = format_variant_costs(variant_costs(tests), noise, {"stem": "the stem's weight gradient only"})
    assert "+5.00%  [+2.52%, +7.48%]" in text and "the stem's weight gradient only" in text

    from analysis.__main__ import main as analysis_main

    assert analysis_main(["freeze-test-report", "--runs", ",".join(baselines), "--tracking-uri", store]) == 0
    assert analysis_main(["freeze-test-report", "--runs", ",", "--tracking-uri", store]) == 2


def test_schedule_derivation_with_a_stem_policy_counts_its_saving() -> None:
    from analysis.schedule import derive_schedule, schedule_with_prediction

    cfg = ExperimentConfig.model_validate(tiny_dict())
    fm = flop_model(cfg, 4)
    conv = pd.Series({0: 2, 1: 4, 2: 6, 3: pd.NA})
    plain = derive_schedule(conv, 4, 12)
    assert "stem" not in plain  # the default is not written
    saved = {}
    for stem in ("with_first", "last", "never"):
        sched = derive_schedule(conv, 4, 12, stem=stem)
        assert sched.get("stem", "with_first") == stem
        out = schedule_with_prediction(sched, fm, 12)
        assert out["predicted_saving_basis"] == "counted"
        saved[stem] = out["predicted_flop_saving"]
    assert 0 < saved["never"] < saved["last"] < saved["with_first"]
    old = {k: v for k, v in fm.items() if k != "per_step_stem_trains"}  # a run logged before the stem policy
    est = schedule_with_prediction(derive_schedule(conv, 4, 12, stem="never"), old, 12)
    assert est["predicted_saving_basis"] == "estimate"
    assert schedule_with_prediction(plain, old, 12)["predicted_saving_basis"] == "counted"


@pytest.mark.system  # the dashboard in AppTest: cold imports
def test_freeze_test_page_shows_variants_side_by_side(store, tmp_path, monkeypatch) -> None:
    from tests.helpers import assert_clean, open_page, point_app_at

    common = {"uri": store, "artifact_root": (tmp_path / "a").as_uri()}
    # (a run without a layerlock.method tag breaks the run pickers: app/views/state.picker_labels, NaN method)
    base = create_run_from_frames(
        "v", history=_loss(1.0), params={"model.depth": 4}, tags={schema.TAG_METHOD: "mae"}, run_name="b", **common
    )
    for variant, x, T, ratio in (
        ("prefix", 2, 4, 1.05),
        ("prefix", 2, 8, 1.0),
        ("stem", 0, 4, 1.04),
        ("stem", 0, 8, 1.0),
        ("block", 1, 4, 1.0),
    ):
        tags = {
            schema.TAG_PARENT: base,
            schema.TAG_METHOD: schema.METHOD_FREEZE_TEST,
            schema.TAG_FREEZE_STEP: str(T),
            schema.TAG_FREEZE_BLOCKS: str(x),
        }
        if variant != "prefix":
            tags[schema.TAG_FREEZE_VARIANT] = variant
        create_run_from_frames("v", history=_loss(ratio), tags=tags, **common)
    point_app_at(store, tmp_path, monkeypatch)
    at = open_page("freeze_test")
    assert_clean(at)
    assert "Variants side by side" in [h.value for h in at.subheader]
    shown = {df.value.index[0]: df.value for df in at.dataframe if "T=4" in df.value.columns}
    assert shown["stem"].loc["stem", "T=4"] == "1.0400" and shown["stem"].loc["stem", "T=8"] == "1.0000 ✓"
    assert shown["block 1"].loc["block 1", "T=4"] == "1.0000 ✓"
    assert shown["L=2 (with stem)"].loc["L=2 (with stem)", "T=4"] == "1.0500"


@pytest.mark.system  # trains a tiny baseline and five children
def test_freeze_test_variants_end_to_end(store) -> None:
    from mlflow import MlflowClient

    from core.train import load_run_checkpoint
    from tests.helpers import run_cli, tiny_sets

    proc = run_cli(
        "-m", "experiments", "pretrain", "--config", "experiments/configs/mae_tiny.yaml", *tiny_sets(),
        "--tracking-uri", store,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    baseline = proc.stdout.strip().splitlines()[-1]

    def freeze_test(*args: str):
        return run_cli("-m", "experiments", "freeze-test", "--baseline", baseline, *args, "--tracking-uri", store)

    for args in (
        ["--variant", "stem", "--steps", "4"],
        ["--variant", "block", "--steps", "4", "--blocks", "0,2"],
        ["--variant", "prefix-no-stem", "--steps", "4", "--blocks", "2"],
        ["--steps", "4", "--blocks", "2"],
    ):
        proc = freeze_test(*args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "tolerance" in proc.stderr and "saves" in proc.stderr
        if "prefix-no-stem" in args:
            assert "prefix-no-stem is a diagnostic" in proc.stderr
    bad = freeze_test("--variant", "block", "--steps", "4", "--blocks", "4")
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]  # (after mlflow's download bar)
    assert bad.returncode == 2 and len(errors) == 1 and "between 0 and 3" in errors[0], bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in bad.stderr

    client = MlflowClient(store)
    kids = client.search_runs(
        [client.get_run(baseline).info.experiment_id], filter_string=f"tags.`layerlock.parent` = '{baseline}'"
    )
    at4 = load_run_checkpoint(baseline, 4, store)["model"]
    by = {}
    for r in kids:
        assert r.info.status == "FINISHED"
        key = (r.data.tags.get(schema.TAG_FREEZE_VARIANT, "prefix"), int(r.data.tags[schema.TAG_FREEZE_BLOCKS]))
        by[key] = load_run_checkpoint(r.info.run_id, None, store)["model"]
    assert set(by) == {("stem", 0), ("block", 0), ("block", 2), ("prefix-no-stem", 2), ("prefix", 2)}

    def same(state, prefix: str) -> bool:
        names = [n for n in at4 if n.startswith(prefix)]
        assert names
        return all(torch.equal(state[n], at4[n]) for n in names)

    expect = {  # (stem unchanged, block 0, block 1, block 2, block 3 unchanged)
        ("stem", 0): (True, False, False, False, False),
        ("block", 0): (False, True, False, False, False),
        ("block", 2): (False, False, False, True, False),
        ("prefix-no-stem", 2): (False, True, True, False, False),
        ("prefix", 2): (True, True, True, False, False),
    }
    for key, want in expect.items():
        got = (same(by[key], "patch_embed."), *(same(by[key], f"blocks.{i}.") for i in range(4)))
        assert got == want, key
    report = run_cli("-m", "analysis", "freeze-test-report", "--runs", baseline, "--tracking-uri", store)
    assert report.returncode == 0, report.stderr
    for cell in ("stem", "block 0", "block 2", "L=2 no-stem", "L=2 (with stem)"):
        assert cell in report.stdout
    assert "n/a (one seed)" in report.stdout
    grid = run_cli("-m", "analysis", "freeze-grid", "--parent", baseline, "--variant", "block", "--json",
                   "--tracking-uri", store)  # fmt: skip
    assert grid.returncode == 0, grid.stderr
    assert {c["blocks"] for c in json.loads(grid.stdout)["cells"]} == {0, 2}


def test_study_rejects_an_unknown_variant(capsys, store) -> None:
    code = experiments_main(["study", "--variants", "stem,nosuch", "--tracking-uri", store])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --variants nosuch: unknown (any of stem, prefix-no-stem, block, or none)"]
