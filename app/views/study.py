"""A study's claims for the Study page: per claim its rows (estimate, 95% interval, verdict), its
Plotly figures drawn from ``results.json`` (data, not the study's HTML files: nothing stored
is rendered as HTML), and the runs behind it. Pure functions of the results dict.

The figures are ``analysis.study_figures``'s, the same function ``experiments study`` writes its
HTML files with; drawing them from the data keeps the page offline and free of stored markup.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go

from analysis import study_figures
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


def claim_figures(key: str, claim: dict[str, Any]) -> list[go.Figure]:
    """The claim's figures: ``analysis.study_figures``'s (those of the study's HTML files), sized
    for the page."""
    figs = list(study_figures.claim_figures(key, claim).values())
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
