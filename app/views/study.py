"""A study's claims for the Study page: per claim its rows (estimate, 95% interval, verdict), its
Plotly figures rebuilt from ``results.json`` (data, not the study's HTML files: nothing stored
is rendered as HTML), and the runs behind it. Pure functions of the results dict.

The figures follow ``experiments.study.figures`` (the HTML report's); they are rebuilt here
because the dashboard imports ``analysis`` only, and drawing from the data keeps the page offline
and free of stored markup.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go

from analysis.claims import format_estimate

CLAIM_TITLES = {
    "S0_pretraining_matters": "S0 · pretraining matters",
    "S1_depth_order": "S1 · depth order of convergence",
    "S2_cheap_rules_vs_freeze_test": "S2 · cheap rules against the freeze test",
    "S3_compute": "S3 · compute saved",
    "S4_collapse": "S4 · collapse",
}
# The methods whose runs each claim is measured on (the freeze test's children too for S2).
CLAIM_METHODS = {
    "S0_pretraining_matters": ("mae",),
    "S1_depth_order": ("mae",),
    "S2_cheap_rules_vs_freeze_test": ("mae",),
    "S3_compute": ("mae", "freeze_only", "layerlock"),
    "S4_collapse": ("mae", "layerlock", "latent_scheduled", "latent_naive"),
}


def _row(what: str, est: dict | None, verdict: str | None = None, pct: bool = False) -> dict[str, Any]:
    est = est or {}
    text = format_estimate(est, pct=pct) if "mean" in est else "n/a"
    return {"figure": what, "estimate [95% interval] (N)": text, "verdict": verdict or est.get("verdict") or ""}


def claim_rows(key: str, claim: dict[str, Any]) -> pd.DataFrame:
    """One row per measured figure of a claim: what, estimate with interval and N, verdict."""
    rows: list[dict[str, Any]] = []
    if key == "S0_pretraining_matters":
        for metric, v in claim.get("metrics", {}).items():
            rows.append(_row(f"{metric}: MAE - random init", v))
    elif key == "S1_depth_order":
        for rule, v in claim.get("rules", {}).items():
            rows.append(_row(f"{rule} ({v.get('metric', '?')}): Spearman rho", v))
    elif key == "S2_cheap_rules_vs_freeze_test":
        for rule, v in claim.get("rules", {}).items():
            rows.append(_row(f"{rule}: Spearman rho against the freeze test", v.get("spearman"), v.get("verdict")))
            rows.append(_row(f"{rule}: Kendall tau", v.get("kendall"), ""))
        cost = claim.get("freeze_cost", {})
        for side in ("early_deep", "late_deep"):
            if side in cost:
                c = cost[side]
                rows.append(_row(f"freeze L={c['L']} at T={c['T']}: loss ratio - 1", c, ""))
        if "tolerance" in cost:
            rows.append(_row("tolerance (seed spread of the final loss)", cost["tolerance"], ""))
    elif key == "S3_compute":
        for method, v in claim.get("methods", {}).items():
            rows.append(_row(f"{method}: FLOP saving", v.get("flop_saving"), pct=True))
            rows.append(_row(f"{method}: wall saving", v.get("wall_saving"), pct=True))
            for metric, d in (v.get("probe_deltas") or {}).items():
                rows.append(_row(f"{method}: {metric} - MAE", d))
    elif key == "S4_collapse":
        for method, v in claim.get("methods", {}).items():
            rows.append(_row(f"{method}: feat_std min / MAE's", v.get("ratio_to_mae"), v.get("verdict", "")))
    return pd.DataFrame(rows, columns=["figure", "estimate [95% interval] (N)", "verdict"])


def claim_verdict(claim: dict[str, Any]) -> str | None:
    """The claim's headline verdict where it states one."""
    return claim.get("verdict")


def _err(est: dict, upper: bool) -> float:
    if est.get("ci_high") is None or est.get("mean") is None:
        return 0.0
    return est["ci_high"] - est["mean"] if upper else est["mean"] - est["ci_low"]


def _mean(est: dict | None) -> float | None:
    return (est or {}).get("mean")


def claim_figures(key: str, claim: dict[str, Any]) -> list[go.Figure]:
    """The claim's figures (as in the study's HTML report), drawn from its numbers."""
    figs: list[go.Figure] = []
    if key == "S0_pretraining_matters":
        metrics = claim.get("metrics", {})
        fig = go.Figure()
        for who in ("mae", "random_init"):
            fig.add_bar(
                name=who,
                x=list(metrics),
                y=[_mean(metrics[k].get(who)) for k in metrics],
                error_y={"type": "data", "array": [(metrics[k].get(who) or {}).get("sd") or 0 for k in metrics]},
            )
        fig.update_layout(title="MAE against a random-init encoder (mean ± sd over seeds)", barmode="group")
        figs.append(fig)
    elif key == "S1_depth_order":
        posthoc = claim.get("rules", {}).get("posthoc", {})
        fig = go.Figure()
        for seed, steps in posthoc.get("steps", {}).items():
            fig.add_scatter(x=list(range(len(steps))), y=steps, mode="lines+markers", name=f"seed {seed}")
        fig.update_layout(
            title="post-hoc convergence step per block",
            xaxis_title="block (depth)",
            yaxis_title="converged at step (missing: never)",
        )
        figs.append(fig)
    elif key == "S2_cheap_rules_vs_freeze_test":
        rules = claim.get("rules", {})
        fig = go.Figure()
        for stat in ("spearman", "kendall"):
            ests = [rules[r].get(stat) or {} for r in rules]
            fig.add_bar(
                name=stat,
                x=list(rules),
                y=[_mean(e) for e in ests],
                error_y={
                    "type": "data",
                    "array": [_err(e, True) for e in ests],
                    "arrayminus": [_err(e, False) for e in ests],
                },
            )
        fig.update_layout(title="rank agreement with the freeze test (mean, 95% t interval)", barmode="group")
        figs.append(fig)
        grid = claim.get("freeze_cost", {}).get("mean_ratio") or {}
        if grid:
            Ls = list(grid)
            Ts = list(next(iter(grid.values())))
            fig = go.Figure(
                go.Heatmap(
                    z=[[grid[L][T] for T in Ts] for L in Ls],
                    x=[f"T={t}" for t in Ts],
                    y=[f"L={L}" for L in Ls],
                    colorscale="RdBu_r",
                    zmid=1.0,
                    text=[[f"{grid[L][T]:.3f}" for T in Ts] for L in Ls],
                    texttemplate="%{text}",
                )
            )
            fig.update_layout(title="freeze-test final-loss ratio (child / baseline), mean over seeds")
            figs.append(fig)
    elif key == "S3_compute":
        methods = claim.get("methods", {})
        fig = go.Figure()
        for what in ("flop_saving", "wall_saving"):
            ests = [methods[m].get(what) or {} for m in methods]
            fig.add_bar(
                name=what,
                x=list(methods),
                y=[_mean(e) for e in ests],
                error_y={
                    "type": "data",
                    "array": [_err(e, True) for e in ests],
                    "arrayminus": [_err(e, False) for e in ests],
                },
            )
        fig.update_layout(
            title="compute saved against MAE (mean, 95% t interval)", barmode="group", yaxis_tickformat=".0%"
        )
        figs.append(fig)
    elif key == "S4_collapse":
        methods = claim.get("methods", {})
        fig = go.Figure(
            go.Bar(
                x=list(methods),
                y=[_mean(methods[m].get("feat_std_min")) for m in methods],
                error_y={
                    "type": "data",
                    "array": [(methods[m].get("feat_std_min") or {}).get("sd") or 0 for m in methods],
                },
            )
        )
        fig.update_layout(title="smallest per-block feat_std (mean ± sd over seeds)")
        figs.append(fig)
    for fig in figs:
        fig.update_layout(height=340, margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return figs


def claim_runs(results: dict[str, Any], key: str, known: set[str] | None = None) -> list[str]:
    """The run ids a claim was measured on (its methods' runs, every seed; S2 adds the freeze-test
    children), restricted to ``known`` ids when given (runs deleted since are left out)."""
    runs = results.get("runs", {})
    out = [rid for m in CLAIM_METHODS.get(key, ()) for rid in (runs.get(m) or {}).values()]
    if key == "S2_cheap_rules_vs_freeze_test":
        out += [rid for ids in (results.get("freeze_test_children") or {}).values() for rid in ids]
    out = list(dict.fromkeys(str(r) for r in out))
    return [r for r in out if known is None or r in known]
