"""Freeze test: the paper's definition of convergence as an L x T grid.

Each child run froze blocks 0..L-1 of the baseline at step T and trained to the end; a cell is
the child's final loss over the baseline's. Blocks 1..L "had converged" by T when the ratio
stays within the tolerance."""

from __future__ import annotations

import streamlit as st

from app.views import charts, loaders, state

st.title("Freeze test")
uri = state.tracking_uri()
runs = state.load_runs()

parents = [p for p in runs["parent"].dropna().unique() if p in set(runs["run_id"])]
if not parents:
    st.info("No freeze-test sweeps in this store yet. A sweep branches child runs off a baseline's checkpoints "
            "(`python -m experiments freeze-test --help`); children are tagged `layerlock.parent`, "
            "`layerlock.freeze_test.blocks` (L) and `layerlock.freeze_test.step` (T).")
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
tol = c[1].slider("tolerance: converged if loss ≤ (1 + tol) × baseline", 0.0, 0.2, 0.02, 0.005, format="%.3f",
                  key="ft_tol")

with state.notice_errors():
    grid = loaders.freeze_grid(uri, parent, float(tol))
    kids = loaders.children(uri, parent)

n_tested = int(grid.converged.notna().sum().sum())
m = st.columns(3)
m[0].metric("Baseline final loss", f"{grid.baseline_final_loss:.4f}")
m[1].metric("Cells tested", n_tested)
m[2].metric("Cells within tolerance", int(grid.converged.fillna(False).astype(bool).sum().sum()))
st.plotly_chart(charts.freeze_grid_heatmap(grid.ratio, grid.converged, grid.tol,
                                           title="Final loss / baseline (✓ within tolerance)"),
                key="ft_grid")

best = grid.max_converged_prefix()
left, right = st.columns([3, 2])
left.plotly_chart(charts.bars(list(best.index), [int(v) for v in best.to_numpy()], "freeze step T",
                              "largest converged prefix L", title="Largest converged prefix by freeze step"),
                  key="ft_prefix")
cols = ["name", "freeze_blocks", "freeze_step", "status", "final_loss", "run_id"]
right.dataframe(kids[[c for c in cols if c in kids.columns]].rename(
    columns={"freeze_blocks": "L", "freeze_step": "T", "final_loss": "last train/loss"}),
    hide_index=True, key="ft_children")
failed = kids[kids["status"] == "FAILED"]
if not failed.empty:
    st.warning(f"{len(failed)} child run(s) failed; their cells count as not converged.")
