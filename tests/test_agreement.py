"""The freeze test as ground truth: calibrated tolerance and agreement of the cheap rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis import io
from analysis.agreement import (
    DEFAULT_TOL,
    agreement_from_frames,
    calibrated_tolerance,
    format_report,
    freeze_grid,
    freeze_test_steps,
    rule_agreement,
    rule_markers,
    rule_steps,
    tolerance_from_final_losses,
)
from analysis.compare import FINAL_LOSS_PARTS, freeze_grid_from_frames
from analysis.testing import create_run_from_frames, synthetic_layer_metrics
from core.errors import LayerLockError
from tests.helpers import run_cli

# A 3-row grid (L = 1, 2, 4) over T = 100, 200, 300 of an 6-block model; True = passes.
#   L=1: fail pass pass  -> blocks 0 converged at 200
#   L=2: fail fail pass  -> block 1 at 300
#   L=4: pass fail fail  -> blocks 2, 3 never (a pass that does not last does not count)
#   blocks 4, 5: deeper than the largest tested L -> undetermined
PASS = {
    (1, 100): False,
    (1, 200): True,
    (1, 300): True,
    (2, 100): False,
    (2, 200): False,
    (2, 300): True,
    (4, 100): True,
    (4, 200): False,
    (4, 300): False,
}


def grid_from(passes: dict[tuple[int, int], bool], tol: float = 0.02):
    rows = [{"freeze_blocks": L, "freeze_step": T, "final_loss": 1.0 if ok else 1.5} for (L, T), ok in passes.items()]
    return freeze_grid_from_frames(pd.DataFrame(rows), baseline_final_loss=1.0, tol=tol)


def test_freeze_test_steps_known_pattern() -> None:
    truth = freeze_test_steps(grid_from(PASS), n_blocks=6).set_index("block")
    assert truth["status"].tolist() == ["converged", "converged", "never", "never", "undetermined", "undetermined"]
    assert truth.loc[0, "step"] == 200 and truth.loc[1, "step"] == 300
    assert truth["step"].iloc[2:].isna().all()
    assert truth["prefix"].tolist()[:4] == [1, 2, 4, 4]


def test_freeze_test_steps_skip_untested_cells() -> None:
    sparse = {(1, 100): False, (1, 300): True, (2, 200): True}  # (1, 200) and (2, 100/300) untested
    truth = freeze_test_steps(grid_from(sparse), n_blocks=3).set_index("block")
    assert truth.loc[0, "step"] == 300 and truth.loc[1, "step"] == 200
    assert truth.loc[2, "status"] == "undetermined"


def steps(values: list[int | None]) -> pd.Series:
    return pd.Series(pd.array(values, dtype="Int64"), index=pd.Index(range(len(values)), name="block"))


def test_perfect_and_reversed_rules() -> None:
    passes = {(L, T): T >= 100 * L for L in (1, 2, 3) for T in (100, 200, 300)}
    truth = freeze_test_steps(grid_from(passes), n_blocks=4)
    assert truth["step"].tolist()[:3] == [100, 200, 300] and truth["status"].iloc[3] == "undetermined"
    perfect = rule_agreement(steps([100, 200, 300, None]), truth)
    assert perfect["spearman_rho"] == pytest.approx(1.0) and perfect["kendall_tau"] == pytest.approx(1.0)
    assert perfect["mean_abs_error"] == 0.0 and perfect["n_ranked"] == 3 and perfect["n_compared"] == 3
    reversed_ = rule_agreement(steps([300, 200, 100, 50]), truth)
    assert reversed_["spearman_rho"] == pytest.approx(-1.0) and reversed_["kendall_tau"] == pytest.approx(-1.0)
    assert reversed_["mean_abs_error"] == pytest.approx(400 / 3)
    # Off by a constant: ranks agree, the error is the offset.
    late = rule_agreement(steps([150, 250, 350, 0]), truth)
    assert late["spearman_rho"] == pytest.approx(1.0) and late["mean_abs_error"] == pytest.approx(50.0)


def test_never_ranks_after_the_end_and_constant_is_undefined() -> None:
    truth = freeze_test_steps(grid_from(PASS), n_blocks=6)  # 200, 300, never, never
    out = rule_agreement(steps([10, 20, None, None, 5, 5]), truth)
    assert out["spearman_rho"] == pytest.approx(1.0)  # blocks 4, 5 are undetermined: ignored
    assert out["n_compared"] == 2 and out["mean_abs_error"] == pytest.approx((190 + 280) / 2)
    flat = rule_agreement(steps([None] * 6), truth)
    assert flat["spearman_rho"] is None and flat["kendall_tau"] is None and flat["mean_abs_error"] is None


def test_agreement_from_synthetic_layer_metrics() -> None:
    # Blocks converge at 100, 200, 300, never; the freeze grid says the same at T = 100..500.
    layer_df = synthetic_layer_metrics([100, 200, 300, None], total_steps=600, probe_every=50, log_every=10)
    conv = {0: 100, 1: 200, 2: 300}
    passes = {(L, T): all(T >= conv.get(b, 10**9) for b in range(L)) for L in (1, 2, 3) for T in range(100, 501, 100)}
    report = agreement_from_frames(grid_from(passes), rule_steps(layer_df), n_blocks=4)
    assert [b["freeze_test_step"] for b in report["blocks"]] == [100, 200, 300, None]
    assert [b["posthoc"] for b in report["blocks"]] == [100, 200, 300, None]
    post = report["rules"]["posthoc"]
    assert post["spearman_rho"] == pytest.approx(1.0) and post["mean_abs_error"] == 0.0
    assert report["rules"]["online"]["spearman_rho"] == pytest.approx(1.0)
    markers = rule_markers(report)
    assert markers[markers["rule"] == "posthoc"][["blocks", "step"]].values.tolist() == [[1, 100], [2, 200], [3, 300]]
    assert report["blocks"][3]["freeze_test"] == "undetermined"  # deeper than the largest tested L
    text = format_report(
        {**report, "run_id": "x", "baseline_final_loss": 1.0, "tolerance": {"line": "tolerance 2% = default"}}
    )
    assert text.splitlines()[0] == "tolerance 2% = default" and "n/d" in text and "posthoc" in text


def test_tolerance_from_final_losses() -> None:
    tol = tolerance_from_final_losses({"a": 1.0, "b": 1.1, "c": 1.2}, group="g")
    assert tol.tol == pytest.approx(0.1 / 1.1)  # sample sd 0.1 over mean 1.1
    assert tol.calibrated
    assert tol.line().startswith("tolerance 9.09% = relative sd of final loss over 3 seeds of group g")
    with pytest.raises(LayerLockError, match=">= 2 seeds"):
        tolerance_from_final_losses({"a": 1.0, "b": float("nan")})


def _loss_history(final: float, steps: int = 10) -> pd.DataFrame:
    # The last three logged values average to ``final``.
    values = [final + 1.0] * (steps - 3) + [final - 0.01, final, final + 0.01]
    return pd.DataFrame({"step": np.arange(steps), "metric": "train/loss", "value": values})


@pytest.fixture
def group_store(store: str, tmp_path) -> dict[str, str]:
    """Three seeds of one group (final losses 1.0, 1.1, 1.2), a FAILED member, a lone run, and
    a freeze-test child of the first seed whose loss is 5% above its baseline."""
    common = {"uri": store, "artifact_root": (tmp_path / "artifacts").as_uri(), "params": {"model.depth": 4}}
    layer_df = synthetic_layer_metrics([4, 8, None, None], total_steps=12, probe_every=4, log_every=2)
    seeds = [
        create_run_from_frames(
            "g", history=_loss_history(v), layer_df=layer_df, tags={io.TAG_GROUP: "grp", io.TAG_METHOD: "mae"}, **common
        )
        for v in (1.0, 1.1, 1.2)
    ]
    create_run_from_frames("g", history=_loss_history(0.1), status="FAILED", tags={io.TAG_GROUP: "grp"}, **common)
    lone = create_run_from_frames(
        "g", history=_loss_history(1.0), layer_df=layer_df, tags={io.TAG_GROUP: "solo"}, **common
    )
    for parent in (seeds[0], lone):
        for L, T, ratio in ((1, 4, 1.0), (1, 8, 1.0), (2, 4, 1.2), (2, 8, 1.0)):
            create_run_from_frames(
                "g",
                history=_loss_history(ratio),
                **common,
                tags={
                    io.TAG_PARENT: parent,
                    io.TAG_FREEZE_STEP: str(T),
                    io.TAG_FREEZE_BLOCKS: str(L),
                    io.TAG_METHOD: "freeze_test",
                    io.TAG_GROUP: "grp",
                },
            )  # a group tag must not count
    return {"baseline": seeds[0], "lone": lone, "seeds": ",".join(seeds)}


def _freeze_test(run_id: str, uri: str):
    return io.load_freeze_test(run_id, uri, FINAL_LOSS_PARTS)


def test_calibrated_tolerance_from_group(group_store, store) -> None:
    tol = calibrated_tolerance(_freeze_test(group_store["baseline"], store))
    assert tol.source == "calibrated" and tol.group == "grp"
    assert sorted(tol.runs) == sorted(group_store["seeds"].split(","))
    # A new draw from a group of N=3: sd * sqrt(1 + 1/3) / mean, scored against the mean 1.1.
    assert tol.tol == pytest.approx(0.1 * math.sqrt(1 + 1 / 3) / 1.1)
    assert tol.reference == "group mean" and tol.reference_loss == pytest.approx(1.1)
    assert "sd x sqrt(1 + 1/N) / mean" in tol.line() and "mean final loss 1.1 of 3 seeds" in tol.line()
    explicit = calibrated_tolerance(_freeze_test(group_store["baseline"], store), tol=0.3)
    assert explicit.tol == 0.3 and explicit.line().startswith("tolerance 30% = given explicitly (--tol)")
    assert "against the mean final loss 1.1 of 3 seeds" in explicit.line()  # a group keeps the mean as reference


def test_group_scored_grid_uses_the_group_mean(group_store, store) -> None:
    grid, tol = freeze_grid(_freeze_test(group_store["baseline"], store))
    # Children 1.0, 1.0, 1.2, 1.0 over the mean 1.1 (not over the seed-0 baseline 1.0).
    assert grid.ratio.loc[2, 4] == pytest.approx(1.2 / 1.1) and grid.reference == "mean of 3 seeds"
    assert bool(grid.converged.loc[2, 4])  # 9.1% <= 10.5%: within a new draw from the group
    lone, lone_tol = freeze_grid(_freeze_test(group_store["lone"], store))
    assert lone.reference == "baseline" and lone.ratio.loc[2, 4] == pytest.approx(1.2)
    assert "against the single baseline run" in lone_tol.line()


@pytest.mark.system
def test_no_group_falls_back_and_says_so(group_store, store) -> None:
    tol = calibrated_tolerance(_freeze_test(group_store["lone"], store))
    assert tol.tol == DEFAULT_TOL and not tol.calibrated
    assert "not calibrated: no seed group of the baseline" in tol.line()
    proc = run_cli("-m", "analysis", "freeze-grid", "--parent", group_store["lone"], "--tracking-uri", store)
    assert proc.returncode == 0, proc.stderr
    assert "tolerance 2% = default, not calibrated: no seed group of the baseline" in proc.stdout


@pytest.mark.system
def test_agreement_cli(group_store, store) -> None:
    proc = run_cli("-m", "analysis", "agreement", "--run", group_store["baseline"], "--json", "--tracking-uri", store)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["tolerance"]["calibrated"] and "3 seeds of group grp" in proc.stderr
    # Against the group mean 1.1 with 10.5%: L=1 and L=2 pass at 4 and 8 -> blocks 0 and 1 tie at 4.
    assert [b["freeze_test_step"] for b in report["blocks"]] == [4, 4, None, None]
    assert report["ties"] == [
        {"step": 4, "status": "converged", "blocks": [0, 1], "prefixes": [1, 2], "passed_at": [4, 8], "failed_at": []}
    ]
    assert "freeze test ties blocks 0-1: all converged from T=4" in proc.stderr
    assert [b["freeze_test"] for b in report["blocks"]][2:] == ["undetermined"] * 2
    assert set(report["rules"]) == {"posthoc", "online", "gradnorm"}
    text = run_cli(
        "-m", "analysis", "agreement", "--run", group_store["baseline"], "--tol", "0.5", "--tracking-uri", store
    )
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("tolerance 50% = given explicitly (--tol)") and "spearman" in text.stdout
    bad = run_cli("-m", "analysis", "agreement", "--run", "nope", "--tracking-uri", store)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def _with_heldout(history: pd.DataFrame, value: float, step: int = 10) -> pd.DataFrame:
    extra = pd.DataFrame({"step": [step], "metric": ["val/loss_pixel"], "value": [value]})
    return pd.concat([history, extra], ignore_index=True)


def test_final_losses_prefer_the_heldout_loss_only_when_every_run_has_it(store, tmp_path) -> None:
    from analysis.compare import final_losses

    common = {"uri": store, "artifact_root": (tmp_path / "artifacts").as_uri()}
    a = create_run_from_frames("h", history=_with_heldout(_loss_history(1.0), 0.50), **common)
    b = create_run_from_frames("h", history=_with_heldout(_loss_history(1.2), 0.55), **common)
    c = create_run_from_frames("h", history=_loss_history(1.4), **common)
    runs = io.load_runs([a, b, c], store, FINAL_LOSS_PARTS)
    losses, how = final_losses([runs[a], runs[b]])
    assert losses == {a: pytest.approx(0.50), b: pytest.approx(0.55)} and how.startswith("val/loss_pixel")
    # one run without it: every run falls back to train/loss, never a mix of the two
    losses, how = final_losses(runs.values())
    assert losses == {a: pytest.approx(1.0), b: pytest.approx(1.2), c: pytest.approx(1.4)}
    assert how == "mean of the last 3 logged train/loss"


def test_heldout_loss_is_fixed_clips_and_masks(tiny_cfg) -> None:
    import torch

    from core.data import build_dataset, get_batch
    from core.model import build_model
    from core.objectives import heldout_pixel_loss

    torch.manual_seed(0)
    model = build_model(tiny_cfg.model, tiny_cfg.geometry)
    clips, _ = get_batch(build_dataset(tiny_cfg.data, "val"), range(8))
    first = heldout_pixel_loss(model, clips, tiny_cfg.model.mask_ratio)
    torch.manual_seed(123)  # the global RNG does not pick the masks
    assert heldout_pixel_loss(model, clips, tiny_cfg.model.mask_ratio, batch_size=3) == pytest.approx(first, rel=1e-6)
    with torch.no_grad():
        model.pixel_head.weight.mul_(2.0)  # a different model gives a different loss
    assert heldout_pixel_loss(model, clips, tiny_cfg.model.mask_ratio) != pytest.approx(first, rel=1e-3)
    assert model.training  # the model's mode is restored
