"""Convergence: layer x step heatmap of a per-block metric, per-block curves, detected
convergence steps and the depth-order statistic, with adjustable detection rule.

Over a group of seeds (picked above the run, or opened with ``?group=NAME``): the heatmap of
the mean over the group's finished runs on their common logged steps (sd and min..max on
hover), per-block mean curves in a band, each block's convergence step as the mean over seeds
with its 95% t interval, and the depth-order rho over seeds as the study's S1 claim reads it.
One run of the group can still be shown alone."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import LayerLockError, metric_help, schema
from analysis.claims import format_estimate
from analysis.convergence import RULES
from app.views import charts, controls, errors, groups, loaders, state

RULE_TEXT = {
    "posthoc": "post-hoc (cka_final)",
    "online": "online (cka_prev)",
    "gradnorm": "gradient norm (grad_norm)",
}
RULE_HELP = """- **post-hoc**: the first probe after which cka_final stays ≥ threshold to the end
- **online**: cka_prev ≥ threshold for `patience` probes in a row (what an online freezer could see)
- **gradient norm**: the smoothed grad_norm changes by < eps for `patience` logs"""
NO_GROUP, ALL_SEEDS = "", "__all__"
GROUP_KEY = "convergence_group"  # plain key: the page's group survives a visit to another page
URL_GROUP_KEY = "group_from_url"  # the ?group= value already applied


def _sync_group() -> None:
    st.session_state[GROUP_KEY] = st.session_state.get("conv_group") or NO_GROUP


def pick_group(seed_groups: dict[str, list[str]], container) -> str:
    """The group of seeds shown (``NO_GROUP``: one run), from ``?group=`` once, else the page's choice."""
    wanted = st.query_params.get("group")
    if wanted and st.session_state.get(URL_GROUP_KEY) != wanted:
        st.session_state[URL_GROUP_KEY] = wanted
        if wanted in seed_groups:
            st.session_state[GROUP_KEY] = wanted
    options = [NO_GROUP, *seed_groups]
    current = st.session_state.get(GROUP_KEY, NO_GROUP)
    st.session_state["conv_group"] = current if current in options else NO_GROUP
    return container.selectbox(
        "Group of seeds",
        options,
        key="conv_group",
        format_func=lambda g: f"{g} · {len(seed_groups[g])} runs" if g else "none: one run",
        on_change=_sync_group,
        help="A group is one config trained with several seeds (its finished runs). Pick one to see "
        "the mean over seeds with intervals; then pick one of its runs to see that run alone.",
    )


st.title("Layer convergence")
uri = state.tracking_uri()
runs = state.load_runs()

seed_groups = {g: ids for g, ids in groups.finished_members(runs).items() if len(ids) >= 2}
seed_of = {r: s for r, s in zip(runs["run_id"], runs["seed"], strict=True)}


def seed_label(run_id: str) -> str:
    s = seed_of.get(run_id)
    return f"seed {int(s)}" if s is not None and not pd.isna(s) else run_id[:8]


top = st.columns([3, 2, 2])
run_slot, group_slot = top[0].container(), top[0].container()  # the run first, the group below it
group = pick_group(seed_groups, group_slot) if seed_groups else NO_GROUP
members = seed_groups.get(group, [])
if group:
    labels = state.picker_labels(runs)
    state.seed("conv_member", [ALL_SEEDS, *members], ALL_SEEDS)
    shown = run_slot.selectbox(
        "Run of the group",
        [ALL_SEEDS, *members],
        key="conv_member",
        format_func=lambda r: f"all {len(members)} seeds (mean)" if r == ALL_SEEDS else labels.get(r, r),
    )
    run_id = members[0] if shown == ALL_SEEDS else shown
else:
    shown = None
    run_id = state.pick_run(runs, key="conv_run", container=run_slot)
group_view = bool(group) and shown == ALL_SEEDS
with state.notice_errors():
    rec, ver = loaders.run_version(uri, run_id)
    names = loaders.block_metric_names(uri, run_id, ver)
    if group_view:  # the metrics every run of the group logged
        for other in members[1:]:
            theirs = set(loaders.block_metric_names(uri, other, loaders.run_version(uri, other)[1]))
            names = [n for n in names if n in theirs]
if group_view and not names:
    st.info(f"The runs of group {group} share no per-block metric. Pick one of its runs.")
    st.stop()
if rec.status == "FAILED" and not group_view:
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
live = rec.status == "RUNNING" and not group_view


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


def draw_group(
    group: str, ids: list[str], metric: str, method: str, threshold: float, patience: int | None, log_y: bool
) -> None:
    with state.notice_errors():
        versions = tuple(loaders.run_version(uri, r)[1] for r in ids)
        wide = loaders.group_wide(uri, tuple(ids), versions, metric)
    steps, order, problem = None, None, None
    try:
        steps, order = loaders.group_convergence(uri, tuple(ids), versions, method, threshold, patience)
    except LayerLockError as err:
        problem = str(err)
    mean = wide["mean"]
    logged = wide["logged"]
    note = (
        f"Mean over the {len(logged)} runs of {group} ({', '.join(seed_label(r) for r in logged.index)}) "
        f"at the {len(mean):,} steps all of them logged"
    )
    if logged.nunique() > 1 or int(logged.iloc[0]) != len(mean):
        note += " (their step grids differ: " + ", ".join(f"{seed_label(r)} {n:,}" for r, n in logged.items()) + ")"
    st.caption(note + ". Convergence is detected on each run's own steps, then summarised over seeds.")
    if problem:
        st.warning(f"No convergence steps: {problem}. Choose another rule.")
    if steps is not None:
        rho, tau = order["spearman_rho"], order["kendall_tau"]
        per_run = steps[list(ids)].notna().sum(axis=0)
        m = st.columns(4)
        m[0].metric(
            "Blocks converged (mean per run)",
            f"{per_run.mean():.1f} / {len(steps)}",
            help="per run: " + ", ".join(f"{seed_label(r)} {int(k)}" for r, k in per_run.items()),
        )
        m[1].metric(
            "Spearman ρ (depth vs step)",
            "n/a" if rho["mean"] is None else f"{rho['mean']:+.2f}",
            help="Mean over seeds of each run's rho; +1: blocks converge strictly in depth order (shallow first). "
            "The interval is the 95% t interval over seeds; the verdict reads rho > 0 as the study's S1 does.",
        )
        m[1].caption(f"95% t interval: {format_estimate(rho)} · rho > 0: {rho['verdict']}")
        m[2].metric("Kendall τ", "n/a" if tau["mean"] is None else f"{tau['mean']:+.2f}")
        m[2].caption(f"95% t interval: {format_estimate(tau)}")
        m[3].metric("Last common step", f"{int(mean.index.max())}" if len(mean) else "–")
        if order["undefined_runs"]:
            st.caption(f"rho is undefined in {order['undefined_runs']} run(s) (fewer than two blocks converged).")
    band = st.radio(
        "Band",
        ["min..max", "sd"],
        horizontal=True,
        key="conv_band",
        help="the shade around each block's mean curve: the range over the runs, or mean ± sd",
    )
    st.plotly_chart(
        charts.group_heatmap(wide, metric, steps, title=f"mean {metric} per block over {len(logged)} seeds"),
        key="conv_group_heatmap",
    )
    st.plotly_chart(
        charts.group_block_curves(
            wide,
            metric,
            steps,
            threshold if metric == RULES[method]["metric"] else None,
            band=band,
            title=f"mean {metric} per block, {band} band (★ mean convergence step, 95% interval)",
            log_y=log_y,
        ),
        key="conv_group_curves",
    )
    if steps is not None:
        left, right = st.columns([3, 2])
        left.plotly_chart(
            charts.group_convergence_order(
                steps, {r: seed_label(r) for r in ids}, int(mean.index.max()), title="Convergence step by depth"
            ),
            key="conv_group_order",
        )
        table = pd.DataFrame(
            {
                "block": steps["block"].astype(int),
                "mean step": steps["mean"].round(1),
                "ci low": pd.to_numeric(steps["ci_low"], errors="coerce").round(1),
                "ci high": pd.to_numeric(steps["ci_high"], errors="coerce").round(1),
                "sd": pd.to_numeric(steps["sd"], errors="coerce").round(1),
                "converged in": [f"{n} / {k}" for n, k in zip(steps["n"], steps["n_runs"], strict=True)],
                **{seed_label(r): steps[r] for r in ids},
            }
        )
        right.dataframe(table, hide_index=True, key="conv_group_table")
        right.caption("mean, sd and 95% t interval over the runs in which the block converged")


if group_view:
    draw_group(group, members, metric, method, threshold, patience, log_y)
else:
    errors.fragment(draw, run_every=5 if live else None)(run_id, metric, method, threshold, patience, log_y)
