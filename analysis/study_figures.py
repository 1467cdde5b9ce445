"""A study's Plotly figures, from its results dict (``results.json``): the one place they are built.

``experiments study`` writes them as ``figures/<name>.html``; the dashboard's Study page draws
the same figures from the stored ``results.json`` (data, never the stored HTML). Pure functions:
no store, no Streamlit; a claim or part that is missing (an older or partial study) leaves its
figure out rather than failing.

Figures (name: claim, what it shows):

- ``s0_pretraining`` (S0): MAE and random init per probe metric, mean ± sd over seeds.
- ``s1_depth_order`` (S1): the post-hoc convergence step per block, one line per seed.
- ``s2_agreement`` (S2): Spearman and Kendall agreement with the freeze test per rule, mean and
  95% t interval.
- ``s2_freeze_grid`` (S2): the freeze test's final-loss ratio (child / baseline) per L and T,
  mean over seeds.
- ``s3_compute`` (S3): FLOP and wall saving against MAE per method, mean and 95% t interval.
- ``s4_collapse`` (S4): the smallest per-block feat_std per method, mean ± sd over seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import plotly.graph_objects as go

# Figure name -> the claim (key of ``results["claims"]``) it is drawn from, in report order.
FIGURES: dict[str, str] = {
    "s0_pretraining": "S0_pretraining_matters",
    "s1_depth_order": "S1_depth_order",
    "s2_agreement": "S2_cheap_rules_vs_freeze_test",
    "s2_freeze_grid": "S2_cheap_rules_vs_freeze_test",
    "s3_compute": "S3_compute",
    "s4_collapse": "S4_collapse",
}


def _mean(est: dict | None) -> float | None:
    return (est or {}).get("mean")


def _sd(est: dict | None) -> float:
    return (est or {}).get("sd") or 0


def _err(est: dict | None, upper: bool) -> float:
    """The distance from the mean to the interval's end (0 without an interval)."""
    est = est or {}
    if est.get("ci_high") is None or est.get("mean") is None:
        return 0.0
    return est["ci_high"] - est["mean"] if upper else est["mean"] - est["ci_low"]


def _interval_bar(fig: go.Figure, name: str, x: list[str], ests: list[dict]) -> None:
    """Bars of the estimates' means with their 95% t intervals as error bars."""
    fig.add_bar(
        name=name,
        x=x,
        y=[_mean(e) for e in ests],
        error_y={"type": "data", "array": [_err(e, True) for e in ests], "arrayminus": [_err(e, False) for e in ests]},
    )


def _s0_pretraining(claim: dict[str, Any]) -> go.Figure | None:
    metrics = claim.get("metrics") or {}
    if not metrics:
        return None
    fig = go.Figure()
    for who in ("mae", "random_init"):
        ests = [metrics[k].get(who) for k in metrics]
        fig.add_bar(
            name=who,
            x=list(metrics),
            y=[_mean(e) for e in ests],
            error_y={"type": "data", "array": [_sd(e) for e in ests]},
        )
    fig.update_layout(title="S0: MAE against a random-init encoder (mean ± sd over seeds)", barmode="group")
    return fig


def _s1_depth_order(claim: dict[str, Any]) -> go.Figure | None:
    steps_by_seed = ((claim.get("rules") or {}).get("posthoc") or {}).get("steps") or {}
    if not steps_by_seed:
        return None
    fig = go.Figure()
    for seed, steps in steps_by_seed.items():
        fig.add_scatter(x=list(range(len(steps))), y=steps, mode="lines+markers", name=f"seed {seed}")
    fig.update_layout(
        title="S1: post-hoc convergence step per block",
        xaxis_title="block (depth)",
        yaxis_title="converged at step (missing: never)",
    )
    return fig


def _s2_agreement(claim: dict[str, Any]) -> go.Figure | None:
    rules = claim.get("rules") or {}
    if not rules:
        return None
    fig = go.Figure()
    for stat in ("spearman", "kendall"):
        _interval_bar(fig, stat, list(rules), [rules[r].get(stat) or {} for r in rules])
    fig.update_layout(title="S2: rank agreement with the freeze test (mean, 95% t interval)", barmode="group")
    return fig


def _s2_freeze_grid(claim: dict[str, Any]) -> go.Figure | None:
    grid = (claim.get("freeze_cost") or {}).get("mean_ratio") or {}
    if not grid:
        return None
    Ls = list(grid)
    Ts = list(next(iter(grid.values())))
    z = [[grid[L].get(T) for T in Ts] for L in Ls]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"T={t}" for t in Ts],
            y=[f"L={L}" for L in Ls],
            colorscale="RdBu_r",
            zmid=1.0,
            text=[["" if v is None else f"{v:.3f}" for v in row] for row in z],
            texttemplate="%{text}",
        )
    )
    fig.update_layout(title="S2: freeze-test final-loss ratio (child / baseline), mean over seeds")
    return fig


def _s3_compute(claim: dict[str, Any]) -> go.Figure | None:
    methods = claim.get("methods") or {}
    if not methods:
        return None
    fig = go.Figure()
    for what in ("flop_saving", "wall_saving"):
        _interval_bar(fig, what, list(methods), [methods[m].get(what) or {} for m in methods])
    fig.update_layout(
        title="S3: compute saved against MAE (mean, 95% t interval)", barmode="group", yaxis_tickformat=".0%"
    )
    return fig


def _s4_collapse(claim: dict[str, Any]) -> go.Figure | None:
    methods = claim.get("methods") or {}
    if not methods:
        return None
    ests = [methods[m].get("feat_std_min") for m in methods]
    fig = go.Figure(
        go.Bar(
            x=list(methods),
            y=[_mean(e) for e in ests],
            error_y={"type": "data", "array": [_sd(e) for e in ests]},
        )
    )
    fig.update_layout(title="S4: smallest per-block feat_std (mean ± sd over seeds)")
    return fig


_BUILDERS: dict[str, Callable[[dict[str, Any]], go.Figure | None]] = {
    "s0_pretraining": _s0_pretraining,
    "s1_depth_order": _s1_depth_order,
    "s2_agreement": _s2_agreement,
    "s2_freeze_grid": _s2_freeze_grid,
    "s3_compute": _s3_compute,
    "s4_collapse": _s4_collapse,
}


def claim_figures(key: str, claim: dict[str, Any]) -> dict[str, go.Figure]:
    """The figures of one claim (``key`` of ``results["claims"]``), by name; none for an unknown key."""
    figs = {name: _BUILDERS[name](claim) for name, of in FIGURES.items() if of == key}
    return {name: fig for name, fig in figs.items() if fig is not None}


def study_figures(results: dict[str, Any]) -> dict[str, go.Figure]:
    """Every figure of a study's results dict, by name (the study's ``figures/<name>.html``), in
    the order of :data:`FIGURES`; a figure whose claim or numbers are missing is left out."""
    claims = results.get("claims") or {}
    figs: dict[str, go.Figure] = {}
    for key in dict.fromkeys(FIGURES.values()):
        if key in claims:
            figs.update(claim_figures(key, claims[key] or {}))
    return figs
