"""A study's figures (``analysis.study_figures``) from a synthetic results dict: every figure carries
the claims' numbers, and the study's HTML writer and the dashboard's Study page draw the same
figures, from the same function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import study_figures as sf
from app.views import study as sv
from tests.helpers import synthetic_study_results

NAMES = ["s0_pretraining", "s1_depth_order", "s2_agreement", "s2_freeze_grid", "s3_compute", "s4_collapse"]
RUNS = {"mae": ["m0", "m1"], "layerlock": ["l0", "l1"], "latent_naive": ["n0", "n1"]}


@pytest.fixture()
def results() -> dict:
    return synthetic_study_results("study-x", RUNS, [0, 1])


def _trace(fig, name: str | None = None):
    """The figure's trace called ``name`` (its only trace when None)."""
    traces = [t for t in fig.data if name is None or t.name == name]
    assert len(traces) == 1, [t.name for t in fig.data]
    return traces[0]


def _assert_interval_bars(trace, ests: list[dict]) -> None:
    """The bars are the estimates' means; the error bars reach their 95% interval's ends."""
    assert list(trace.y) == pytest.approx([e["mean"] for e in ests])
    hi = [y + up for y, up in zip(trace.y, trace.error_y.array, strict=True)]
    lo = [y - down for y, down in zip(trace.y, trace.error_y.arrayminus, strict=True)]
    assert hi == pytest.approx([e["ci_high"] for e in ests]) and lo == pytest.approx([e["ci_low"] for e in ests])


def test_every_figure_carries_the_claims_numbers(results: dict) -> None:
    c = results["claims"]
    figs = sf.study_figures(results)
    assert list(figs) == NAMES == list(sf.FIGURES)

    s0 = c["S0_pretraining_matters"]["metrics"]
    for who in ("mae", "random_init"):
        bars = _trace(figs["s0_pretraining"], who)
        assert list(bars.x) == list(s0)
        assert list(bars.y) == pytest.approx([s0[k][who]["mean"] for k in s0])
        assert list(bars.error_y.array) == pytest.approx([s0[k][who]["sd"] for k in s0])  # mean ± sd

    steps = c["S1_depth_order"]["rules"]["posthoc"]["steps"]
    lines = {t.name: list(t.y) for t in figs["s1_depth_order"].data}
    assert lines == {f"seed {s}": st for s, st in steps.items()}

    rules = c["S2_cheap_rules_vs_freeze_test"]["rules"]
    for stat in ("spearman", "kendall"):
        bars = _trace(figs["s2_agreement"], stat)
        assert list(bars.x) == list(rules)
        _assert_interval_bars(bars, [rules[r][stat] for r in rules])

    grid = c["S2_cheap_rules_vs_freeze_test"]["freeze_cost"]["mean_ratio"]
    heat = _trace(figs["s2_freeze_grid"])
    assert [list(row) for row in heat.z] == [list(row.values()) for row in grid.values()]
    assert list(heat.y) == [f"L={L}" for L in grid] and list(heat.x) == [f"T={T}" for T in next(iter(grid.values()))]

    s3 = c["S3_compute"]["methods"]
    for what in ("flop_saving", "wall_saving"):
        bars = _trace(figs["s3_compute"], what)
        assert list(bars.x) == list(s3)
        _assert_interval_bars(bars, [s3[m][what] for m in s3])

    s4 = c["S4_collapse"]["methods"]
    bars = _trace(figs["s4_collapse"])
    assert list(bars.x) == list(RUNS)
    assert list(bars.y) == pytest.approx([s4[m]["feat_std_min"]["mean"] for m in s4])
    assert list(bars.error_y.array) == pytest.approx([s4[m]["feat_std_min"]["sd"] for m in s4])


def test_missing_parts_leave_their_figures_out(results: dict) -> None:
    """An older or partial study: no freeze grid, no S4 claim, a rule without its interval."""
    c = results["claims"]
    c["S2_cheap_rules_vs_freeze_test"]["freeze_cost"] = {}
    del c["S4_collapse"]
    c["S2_cheap_rules_vs_freeze_test"]["rules"]["posthoc"]["kendall"] = {"mean": 0.5, "ci_low": None, "ci_high": None}
    figs = sf.study_figures(results)
    assert list(figs) == ["s0_pretraining", "s1_depth_order", "s2_agreement", "s3_compute"]
    kendall = _trace(figs["s2_agreement"], "kendall")
    assert kendall.y[0] == 0.5 and kendall.error_y.array[0] == 0 and kendall.error_y.arrayminus[0] == 0
    assert sf.study_figures({}) == {} and sf.claim_figures("S9_unknown", {}) == {}


def _drawn(fig) -> tuple:
    """What a figure shows: its traces and its title (not the page's sizing)."""
    return [t.to_plotly_json() for t in fig.data], fig.layout.title.text


def test_the_page_and_the_writer_draw_the_same_figures(
    results: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from experiments import study

    page = [fig for key, claim in results["claims"].items() for fig in sv.claim_figures(key, claim)]
    made = sf.study_figures(results)
    assert [_drawn(f) for f in page] == [_drawn(f) for f in made.values()]

    calls = []
    real = sf.study_figures

    def spy(res: dict) -> dict:
        calls.append(res)
        return real(res)

    monkeypatch.setattr(sf, "study_figures", spy)
    monkeypatch.setattr(study, "report_markdown", lambda res: "")  # the report reads keys the synthetic lacks
    study.write_outputs(results, tmp_path)
    assert len(calls) == 1 and calls[0] is results  # the writer's figures are this function's
    written = sorted(p.stem for p in (tmp_path / "figures").glob("*.html"))
    assert written == sorted(NAMES) and json.loads((tmp_path / "results.json").read_text())["figures"] == NAMES
    page_s3 = next(f for f in page if f.layout.title.text.startswith("S3"))
    assert page_s3.layout.title.text in (tmp_path / "figures" / "s3_compute.html").read_text()
