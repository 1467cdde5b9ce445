"""Convergence: layer x step heatmap of a per-block metric, per-block curves, detected
convergence steps and the depth-order statistic, with adjustable detection rule."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import LayerLockError, metric_help, schema
from analysis.convergence import RULES
from app.views import charts, controls, errors, loaders, state

RULE_TEXT = {
    "posthoc": "post-hoc (cka_final)",
    "online": "online (cka_prev)",
    "gradnorm": "gradient norm (grad_norm)",
}
RULE_HELP = """- **post-hoc**: the first probe after which cka_final stays ≥ threshold to the end
- **online**: cka_prev ≥ threshold for `patience` probes in a row (what an online freezer could see)
- **gradient norm**: the smoothed grad_norm changes by < eps for `patience` logs"""

st.title("Layer convergence")
uri = state.tracking_uri()
runs = state.load_runs()

top = st.columns([3, 2, 2])
run_id = state.pick_run(runs, key="conv_run", container=top[0])
with state.notice_errors():
    rec, ver = loaders.run_version(uri, run_id)
    names = loaders.block_metric_names(uri, run_id, ver)
if rec.status == "FAILED":
    st.warning(
        f"This run failed ({rec.tags.get(schema.TAG_FAILURE, 'no reason recorded')}); "
        "showing what it logged before it stopped."
    )
if not names:
    st.info(
        f"Run {rec.name or run_id[:8]} has no per-block metrics (probes disabled, or it stopped before "
        "its first probe). Pick another run."
    )
    st.stop()

state.seed("conv_metric", names, "cka_final")
metric = top[1].selectbox(
    "Per-block metric",
    names,
    key="conv_metric",
    format_func=lambda m: m,
    help="\n".join(f"- **{k}**: {metric_help(k)}" for k in names),
)
# What the chosen indicator measures (and what would fool it): its one line from core.schema.
top[1].caption(metric_help(metric) or "no description recorded for this metric")
state.seed("conv_method", list(RULES), "posthoc")
method = top[2].selectbox(
    "Convergence rule", list(RULES), key="conv_method", format_func=lambda m: RULE_TEXT[m], help=RULE_HELP
)

rule = RULES[method]
ctl = st.columns([3, 2, 2])
threshold, patience = controls.rule_controls(ctl[0], ctl[1], method, rule, "conv")
log_y = ctl[2].toggle("log scale", value=metric in ("grad_norm", "update_ratio"), key=f"conv_log_{metric}")
live = rec.status == "RUNNING"


def draw(run_id: str, metric: str, method: str, threshold: float, patience: int | None, log_y: bool) -> None:
    with state.notice_errors():
        rec, ver = loaders.run_version(uri, run_id)
        wide = loaders.metric_wide(uri, run_id, ver, metric)
    conv, problem = None, None
    try:
        conv = loaders.convergence(uri, run_id, ver, method, threshold, patience)
    except LayerLockError as err:
        problem = str(err)
    if live:
        st.caption(
            f"Run is training: last logged step {int(wide.index.max()) if len(wide) else 0}; "
            "this section refreshes every 5 s."
        )
    if problem:
        st.warning(f"No convergence steps: {problem}. Choose another rule.")

    if conv is not None:
        from analysis.convergence import order_statistics

        stats = order_statistics(conv)
        m = st.columns(4)
        m[0].metric("Blocks converged", f"{int(conv.notna().sum())} / {conv.size}")
        rho, tau = stats["spearman_rho"], stats["kendall_tau"]
        m[1].metric(
            "Spearman ρ (depth vs step)",
            "n/a" if rho is None else f"{rho:+.2f}",
            help="+1: blocks converge strictly in depth order (shallow first)",
        )
        m[2].metric("Kendall τ", "n/a" if tau is None else f"{tau:+.2f}")
        m[3].metric("Last step", f"{int(wide.index.max())}" if len(wide) else "–")

    if wide.empty:
        st.info(f"Run {rec.name or run_id[:8]} has no '{metric}' values yet.")
        return
    st.plotly_chart(
        charts.layer_heatmap(wide, metric, conv, title=f"{metric} per block over training"), key="conv_heatmap"
    )
    st.plotly_chart(
        charts.block_curves(
            wide,
            metric,
            conv,
            threshold if metric == RULES[method]["metric"] else None,
            title=f"{metric} per block (★ detected convergence)",
            log_y=log_y,
        ),
        key="conv_curves",
    )
    if conv is not None:
        left, right = st.columns([3, 2])
        left.plotly_chart(
            charts.convergence_order(conv, int(wide.index.max()), title="Convergence step by depth"), key="conv_order"
        )
        table = pd.DataFrame(
            {
                "block": conv.index.astype(int),
                "converged at step": [None if pd.isna(s) else int(s) for s in conv.to_numpy()],
            }
        )
        right.dataframe(table, hide_index=True, key="conv_table")


errors.fragment(draw, run_every=5 if live else None)(run_id, metric, method, threshold, patience, log_y)
