"""Freeze test: the paper's definition of convergence as an L x T grid, and the cheap rules
scored against it.

Each child run froze blocks 0..L-1 of the baseline at step T and trained to the end; a cell is
the child's final loss over the baseline's. Blocks 1..L "had converged" by T when the ratio
stays within the tolerance, calibrated on the seed spread of the baseline's final loss when the
baseline has a seed group. Each cheap rule's convergence step of block L-1 is marked in row L,
so a rule that agrees with the freeze test puts its marker where the row turns green."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from analysis import METRIC_HELP, schema
from analysis.agreement import VARIANT_LABELS, VARIANT_SAVINGS, rule_markers, ties_lines
from app.views import charts, loaders, state

# One marker per rule, offset within the row so that rules agreeing on a step stay visible.
RULE_STYLE = {
    "posthoc": ("diamond", "#1f77b4", -0.25),
    "online": ("circle", "#ff7f0e", 0.0),
    "gradnorm": ("x", "#9467bd", 0.25),
}


def _edges(steps: list[int]) -> list[float]:
    """Cell edges on a step axis for heatmap columns centred on ``steps`` (ascending)."""
    if len(steps) == 1:
        half = max(steps[0] / 2, 1.0)
        return [steps[0] - half, steps[0] + half]
    mids = [(a + b) / 2 for a, b in zip(steps[:-1], steps[1:], strict=True)]
    return [steps[0] - (mids[0] - steps[0]), *mids, steps[-1] + (steps[-1] - mids[-1])]


def grid_with_rules(grid: Any, markers: pd.DataFrame, title: str) -> go.Figure:
    """The L x T heatmap on a true step axis, with each rule's step for block L-1 in row L."""
    fig = charts.freeze_grid_heatmap(grid.ratio, grid.converged, grid.tol, title=title)
    steps = [int(t) for t in grid.ratio.columns]
    rows = [int(b) for b in grid.ratio.index]
    # Numeric axes (step on x, row index on y) so markers can sit between tested steps.
    fig.update_traces(
        x=_edges(steps),
        y=list(range(len(rows))),
        customdata=np.tile(steps, (len(rows), 1)),
        hovertemplate="freeze step T=%{customdata}<br>final loss / baseline %{z:.4f}<extra></extra>",
        selector={"type": "heatmap"},
    )
    for rule, (symbol, color, offset) in RULE_STYLE.items():
        pts = markers[markers["rule"] == rule]
        if pts.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=pts["step"],
                y=[rows.index(L) + offset for L in pts["blocks"]],
                mode="markers",
                name=rule,
                marker={"symbol": symbol, "color": color, "size": 12, "line": {"width": 1.5, "color": "white"}},
                customdata=pts["block"],
                hovertemplate=f"{rule}: block %{{customdata}} converged at step %{{x}}<extra></extra>",
            )
        )
    fig.update_xaxes(
        type="linear",
        title_text="step (heatmap columns: tested freeze steps T)",
        tickvals=steps,
        ticktext=[str(t) for t in steps],
    )
    fig.update_yaxes(
        type="linear", tickvals=list(range(len(rows))), ticktext=[f"L={b}" for b in rows], range=[-0.5, len(rows) - 0.5]
    )
    fig.update_layout(showlegend=True)
    return fig


st.title("Freeze test")
uri = state.tracking_uri()
runs = state.load_runs()

parents = [p for p in runs["parent"].dropna().unique() if p in set(runs["run_id"])]
if not parents:
    st.info(
        "No freeze-test sweeps in this store yet. A sweep branches child runs off a baseline's checkpoints "
        "(`python -m experiments freeze-test --baseline RUN --grid`, see `--help`); children are tagged "
        "`layerlock.parent`, `layerlock.freeze_test.blocks` (L) and `layerlock.freeze_test.step` (T)."
    )
    st.stop()

# A selected child stands for its sweep.
head = next(iter(state.selected()), None)
if head in set(runs["run_id"]) and head not in parents:
    parent_of = runs.set_index("run_id").loc[head, "parent"]
    if isinstance(parent_of, str) and parent_of in parents:
        state.promote(parent_of)
order = [r for r in runs["run_id"] if r in parents]  # newest first
c = st.columns([3, 2])
parent = state.pick_run(runs, key="ft_parent", label="Baseline run (sweep parent)", options=order, container=c[0])

with state.notice_errors():
    calibrated = loaders.freeze_tolerance(uri, parent)
# The slider starts at the calibrated value for each baseline; moving it overrides.
top = max(0.2, math.ceil(calibrated.tol * 100) / 100)
if st.session_state.get("ft_tol_for") != parent:
    st.session_state["ft_tol"] = min(calibrated.tol, top)
    st.session_state["ft_tol_for"] = parent


def _reset_tol() -> None:
    st.session_state["ft_tol"] = min(calibrated.tol, top)


tol = c[1].slider(
    "tolerance: converged if loss ≤ (1 + tol) × baseline", 0.0, top, step=0.001, format="%.3f", key="ft_tol"
)
by_hand = not math.isclose(tol, calibrated.tol, abs_tol=5e-4)
c[1].button(
    "reset to calibrated" if calibrated.calibrated else "reset to default",
    key="ft_tol_reset",
    on_click=_reset_tol,
    disabled=not by_hand,
)
if by_hand:
    st.caption(f"tolerance {tol:.1%} set on the slider (the {calibrated.source} value: {calibrated.line()})")
else:
    st.caption(calibrated.line())
    tol = calibrated.tol

with state.notice_errors():
    grid = loaders.freeze_grid(uri, parent, float(tol))
    kids = loaders.children(uri, parent)
    report = loaders.agreement(uri, parent, float(tol))

n_tested = int(grid.converged.notna().sum().sum())
m = st.columns(3)
m[0].metric(
    "Reference final loss", f"{grid.baseline_final_loss:.4f}", help=f"cells are scored against the {grid.reference}"
)
m[1].metric("Cells tested", n_tested)
m[2].metric("Cells within tolerance", int(grid.converged.fillna(False).astype(bool).sum().sum()))
st.plotly_chart(
    grid_with_rules(
        grid,
        rule_markers(report),
        "Final loss / baseline (✓ within tolerance); markers: each rule's step for block L-1",
    ),
    key="ft_grid",
)
st.caption(
    "In row L a rule's marker sits at the step where that rule saw block L-1 converge (no marker: never). "
    "A rule that agrees with the freeze test marks each row where it turns ✓ and stays so."
)

variants = [v for v in schema.FREEZE_VARIANTS if v in set(kids.get("freeze_variant", pd.Series(dtype=str)))]
if len(variants) > 1 or (variants and variants != [schema.VARIANT_PREFIX]):
    st.subheader("Variants side by side")
    st.caption(
        "Each variant freezes a different set at T (final loss / reference; ✓ within tolerance). "
        "prefix: blocks 0..L-1 with the stem (the grid above); stem: the stem alone; prefix-no-stem: "
        "blocks 0..L-1 with the stem trainable (a diagnostic: no saving); block: block i alone."
    )
    cols = st.columns(len(variants))
    for col, variant in zip(cols, variants, strict=True):
        with state.notice_errors():
            vgrid = loaders.freeze_grid(uri, parent, float(tol), variant)
        cells = {
            f"T={int(t)}": [
                "" if pd.isna(v) else f"{v:.4f}{' ✓' if bool(ok) else ''}"
                for v, ok in zip(vgrid.ratio[t], vgrid.converged[t].fillna(False), strict=True)
            ]
            for t in vgrid.ratio.columns
        }
        shown_cells = pd.DataFrame(cells, index=[VARIANT_LABELS[variant].format(x=int(x)) for x in vgrid.ratio.index])
        col.markdown(f"**{variant}**")
        col.dataframe(shown_cells, key=f"ft_variant_{variant}")
        col.caption(f"saves: {VARIANT_SAVINGS[variant]}")

st.subheader("Cheap rules against the freeze test")
for line in ties_lines(report.get("ties") or []):
    st.caption(line)
blocks = pd.DataFrame(report["blocks"])
shown = (
    blocks.assign(
        # pandas stores a missing step as NaN in a float column: test with isna, print as an integer.
        freeze_test_step=[
            ("n/d" if s == "undetermined" else "never") if pd.isna(v) else str(int(v))
            for v, s in zip(blocks["freeze_test_step"], blocks["freeze_test"], strict=True)
        ],
        prefix=["n/d" if pd.isna(v) else str(int(v)) for v in blocks["prefix"]],
        **{name: [("never" if pd.isna(v) else str(int(v))) for v in blocks[name]] for name in report["rules"]},
    )
    .drop(columns=["freeze_test"])
    .rename(columns={"prefix": "L used", "freeze_test_step": "freeze test"})
)
left, right = st.columns([3, 2])
left.dataframe(shown, hide_index=True, key="ft_agreement_blocks")
rules = pd.DataFrame(
    [
        {
            "rule": name,
            "metric": r.get("metric"),
            "spearman": r["spearman_rho"],
            "kendall": r["kendall_tau"],
            "mean |step error|": r["mean_abs_error"],
            "blocks ranked": r["n_ranked"],
            "note": r["note"] or "",
        }
        for name, r in report["rules"].items()
    ]
)
right.dataframe(rules, hide_index=True, key="ft_agreement_rules")
right.caption(
    "Rank agreement (Spearman, Kendall) of each rule's steps with the freeze-test steps over the blocks "
    "the freeze test determines ('never' ranks after the end); step error over blocks where both are "
    "steps. Freeze-test steps are tested T's, so the error includes the grid's spacing."
)
st.caption(
    " · ".join(
        f"**{r['metric']}**: {METRIC_HELP[r['metric']]}"
        for r in report["rules"].values()
        if r.get("metric") in METRIC_HELP
    )
)

best = grid.max_converged_prefix()
left, right = st.columns([3, 2])
left.plotly_chart(
    charts.bars(
        list(best.index),
        [int(v) for v in best.to_numpy()],
        "freeze step T",
        "largest converged prefix L",
        title="Largest converged prefix by freeze step",
    ),
    key="ft_prefix",
)
cols = ["name", "freeze_variant", "freeze_blocks", "freeze_step", "status", "final_loss", "run_id"]
right.dataframe(
    kids[[c for c in cols if c in kids.columns]].rename(
        columns={"freeze_variant": "variant", "freeze_blocks": "L", "freeze_step": "T", "final_loss": "last train/loss"}
    ),
    hide_index=True,
    key="ft_children",
)
failed = kids[kids["status"] == "FAILED"]
if not failed.empty:
    st.warning(f"{len(failed)} child run(s) failed; their cells count as not converged.")
