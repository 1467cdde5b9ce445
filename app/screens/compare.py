"""Compare: groups of seeds (or single runs) against a baseline group: loss against step, FLOPs
and wall time (mean with a band, each run faint); mean ± sd (N) tables and seed-paired
differences with their 95% t interval; compute saved; collapse indicators; per-block metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analysis import io, metric_help, schema
from analysis.compare import group_comparison, summarize_run
from analysis.records import eval_metrics
from analysis.stats import INTERVAL_NAME, spread_over_runs, summary_table
from app.views import charts, export, groups, loaders, state

HISTORY_KEYS = (schema.LOSS, schema.LOSS_PIXEL, schema.LOSS_LATENT, schema.FLOPS, schema.WALL_S)
X_AXES = {
    "step": ("step", "step"),
    "FLOPs": (schema.FLOPS, "counted FLOPs"),
    "wall time": (schema.WALL_S, "wall time (s)"),
}
BANDS = {"min..max": "min..max over the group's runs", "sd": "mean ± sd over the group's runs"}

st.title("Compare runs")
uri = state.tracking_uri()
runs = state.load_runs()
members = groups.finished_members(runs)
pick = st.columns(2)
with pick[0]:
    chosen_groups = groups.pick_groups(
        runs,
        members,
        key="cmp_groups",
        label="Groups of seeds",
        help="Runs sharing a layerlock.group tag (one config, several train.seed); finished runs only",
    )
with pick[1]:
    chosen_runs = state.pick_runs(
        runs,
        key="cmp_runs",
        label="Single runs (each a group of one)",
        allow_empty=bool(chosen_groups),
        help="Runs compared on their own, N = 1",
    )
# Compared items: a group of seeds (its finished runs) or one run on its own.
items = {g: members[g] for g in chosen_groups}
items.update({r: [r] for r in chosen_runs if r not in items})
if not items:
    st.info("Choose groups of seeds or runs to compare.")
    st.stop()

run_labels, item_labels, methods, rows, histories, layer = {}, {}, {}, [], {}, {}
with state.notice_errors():
    for item, run_ids in items.items():
        for rid in run_ids:
            rec, ver = loaders.run_version(uri, rid)
            label = f"{rec.name or rid[:8]} ({rec.method or '?'})"
            if label in run_labels.values():
                label = f"{label} {rid[:6]}"
            run_labels[rid] = label
            histories[rid] = loaders.history(uri, rid, ver, HISTORY_KEYS)
            layer[rid] = loaders.layer_metrics(uri, rid, ver, ("eff_rank", "feat_std"))
            meta = {
                "run_id": rid,
                "name": rec.name,
                "method": rec.method,
                "dataset": rec.dataset,
                "status": rec.status,
                "steps": rec.param_int("train.steps"),
            }
            rows.append(
                {
                    "group": item,
                    "seed": rec.param_int("train.seed"),
                    **summarize_run(meta, histories[rid], layer[rid], eval_metrics(rec.metrics)),
                }
            )
            methods.setdefault(item, rec.method)
            if rec.status == "FAILED":
                st.warning(f"{label} failed: {rec.tags.get(io.TAG_FAILURE, 'no reason recorded')}")
        item_labels[item] = (
            groups.group_label(item, members, runs)
            if len(run_ids) > 1 or item in chosen_groups
            else run_labels[run_ids[0]]
        )

# The baseline that savings and differences are measured against: by default the first MAE item.
options = list(items)
first_mae = next((i for i in options if methods.get(i) == "mae"), options[0])
state.seed("cmp_baseline", options, first_mae)
baseline = st.selectbox(
    "Baseline",
    options,
    key="cmp_baseline",
    format_func=item_labels.get,
    help="Savings, differences and verdicts are measured against this group",
)
result = group_comparison(rows, baseline)
table = result.runs
colors = groups.item_colors({item_labels[i]: methods.get(i) for i in options})
run_item = {rid: item for item, ids in items.items() for rid in ids}
run_colors = {run_labels[r]: colors[item_labels[run_item[r]]] for r in run_labels}
line_colors = run_colors if len(set(run_colors.values())) == len(run_colors) else {}

# ---------------------------------------------------------------------------- loss curves
c = st.columns([2, 2, 2, 2, 1])
x_name = c[0].radio("x axis", list(X_AXES), horizontal=True, key="cmp_x")
loss_keys = [k for k in HISTORY_KEYS[:3] if any((h["metric"] == k).any() for h in histories.values())]
if not loss_keys:
    st.info("None of these runs has logged a loss yet.")
    st.stop()
state.seed("cmp_loss", loss_keys, schema.LOSS)
loss_key = c[1].selectbox("Loss", loss_keys, key="cmp_loss")
smooth = c[2].slider("smoothing (logged points)", 1, 50, 1, key="cmp_smooth")
band = c[3].radio(
    "band", list(BANDS), horizontal=True, key="cmp_band", format_func={"min..max": "min..max", "sd": "± sd"}.get
)
log_y = c[4].toggle("log y", value=False, key="cmp_logy")

x_key, x_title = X_AXES[x_name]
curves, members_curves, missing = {}, {}, []
for item, run_ids in items.items():
    per_run = {}
    for rid in run_ids:
        wide = histories[rid].pivot_table(index="step", columns="metric", values="value", aggfunc="last")
        if loss_key not in wide.columns or (x_key != "step" and x_key not in wide.columns):
            missing.append(run_labels[rid])
            continue
        y = wide[loss_key].rolling(smooth, min_periods=1).mean()
        x = pd.Series(wide.index.to_numpy(), index=wide.index) if x_key == "step" else wide[x_key]
        per_run[run_labels[rid]] = pd.DataFrame(
            {"step": wide.index.to_numpy(), "x": x.to_numpy(), "y": y.to_numpy()}
        ).dropna()
    if per_run:
        curves[item_labels[item]] = spread_over_runs(per_run)
        members_curves[item_labels[item]] = per_run
if missing:
    st.caption(f"Not plotted (no {loss_key} or {x_key}): {', '.join(missing)}")
st.plotly_chart(
    charts.band_lines(
        curves, members_curves, x_title, loss_key, colors, band=band, log_y=log_y, title=f"{loss_key} against {x_name}"
    ),
    key="cmp_loss_chart",
)
st.caption(
    f"Each group: the mean at every logged step (thick line), a shaded band of the {BANDS[band]}"
    + (f" (x: the mean over runs of {x_title})" if x_key != "step" else "")
    + f", each run as a faint line. A group of one run is a plain line. {loss_key}: {metric_help(loss_key)}."
)
st.download_button(
    "Download curves (CSV)",
    export.to_csv(export.curves_frame(curves, members_curves, loss_key, x_title, smooth)),
    file_name=f"curves_{loss_key.replace('/', '_')}.csv",
    mime="text/csv",
    key="cmp_curves_csv",
    help="The curves as plotted: each run's and each group's mean (with sd, min, max, N), full float precision; "
    "the smoothing column says how y was smoothed",
)

# ---------------------------------------------------------------------------- groups: mean ± sd (N), paired
st.subheader("Groups: mean ± sd (N)")
text = summary_table(result.summary)
if not text.empty:
    text = text.rename(index=item_labels).reset_index()
    st.dataframe(
        text,
        hide_index=True,
        key="cmp_groups_table",
        column_config={
            c: st.column_config.TextColumn(c.removeprefix(schema.EVAL), help=metric_help(c) or None)
            for c in text.columns
            if c != "group"
        },
    )
st.caption(
    f"Baseline: {item_labels[baseline]}. Savings (flop_saving, wall_saving) are per run, "
    "1 - value / the baseline group's mean; N counts runs with the metric logged."
)
if not result.paired.empty:
    paired = result.paired

    def _num(v) -> str:
        return "n/a" if v is None or pd.isna(v) else f"{v:+.4g}"

    shown_pairs = pd.DataFrame(
        {
            "group": [item_labels.get(g, g) for g in paired["group_b"]],
            "metric": paired["metric"],
            "difference": [_num(v) for v in paired["mean_diff"]],
            INTERVAL_NAME: [
                "n/a" if pd.isna(lo) else f"[{_num(lo)}, {_num(hi)}]"
                for lo, hi in zip(paired["ci_low"], paired["ci_high"], strict=True)
            ],
            "pairs": paired["n"],
            "verdict": paired["verdict"],
        }
    )
    st.markdown(f"**Paired differences against {item_labels[baseline]}**")
    st.dataframe(shown_pairs, hide_index=True, key="cmp_paired_table")
    st.caption(
        f"Difference = group - baseline, matched run by run on train.seed (same data order, masks and "
        f'initialisation); {INTERVAL_NAME} = mean ± t(0.975, N-1) · sd / √N. "no difference": the '
        "interval contains 0; a single pair has no interval (n/a)."
    )

# ---------------------------------------------------------------------------- table and compute
st.subheader("Runs")
eval_cols = [col for col in table.columns if col.startswith(schema.EVAL)]
labels = run_labels
shown = table.assign(run=[labels[r] for r in table["run_id"]], group=[item_labels[g] for g in table["group"]])
st.dataframe(
    shown[
        [
            "run",
            "group",
            "seed",
            "method",
            "status",
            "steps",
            "final_loss",
            "final_loss_pixel",
            "heldout_loss_pixel",
            "total_flops",
            "wall_s",
            "flop_saving",
            "wall_saving",
            "eff_rank_mean",
            "eff_rank_min",
            "feat_std_mean",
            "feat_std_min",
            *eval_cols,
        ]
    ],
    hide_index=True,
    key="cmp_table",
    column_config={
        "final_loss": st.column_config.NumberColumn("final loss", format="%.4f"),
        "final_loss_pixel": st.column_config.NumberColumn("final pixel loss", format="%.4f"),
        "total_flops": st.column_config.NumberColumn("FLOPs", format="%.3e"),
        "wall_s": st.column_config.NumberColumn("wall s", format="%.1f"),
        "flop_saving": st.column_config.NumberColumn("FLOP saving", format="percent"),
        "wall_saving": st.column_config.NumberColumn("time saving", format="percent"),
        "heldout_loss_pixel": st.column_config.NumberColumn(
            "held-out pixel loss", format="%.4f", help=metric_help(schema.HELDOUT_KEY)
        ),
        "eff_rank_mean": st.column_config.NumberColumn("eff. rank (mean)", format="%.2f", help=metric_help("eff_rank")),
        "eff_rank_min": st.column_config.NumberColumn("eff. rank (min)", format="%.2f", help=metric_help("eff_rank")),
        "feat_std_mean": st.column_config.NumberColumn(
            "feature std (mean)", format="%.3f", help=metric_help("feat_std")
        ),
        "feat_std_min": st.column_config.NumberColumn("feature std (min)", format="%.3f", help=metric_help("feat_std")),
        **{col: st.column_config.NumberColumn(col.removeprefix(schema.EVAL), format="%.3f") for col in eval_cols},
    },
)
if methods.get(baseline) != "mae":
    st.caption(f"The baseline ({item_labels[baseline]}) is not an MAE run: savings are against it all the same.")
if eval_cols:
    evals = shown.melt(id_vars=["run"], value_vars=eval_cols, var_name="metric", value_name="value").dropna()
    evals["metric"] = evals["metric"].str.removeprefix(schema.EVAL)
    st.plotly_chart(
        charts.grouped_bars(
            evals,
            "metric",
            "value",
            "run",
            y_title="value",
            colors=line_colors,
            title="Downstream probes (eval/<task>/<metric>)",
        ),
        key="cmp_evals",
    )
else:
    st.caption("No evaluation metrics yet: `python -m experiments evaluate --run RUN_ID` adds eval/<task>/<metric>.")

left, right = st.columns(2)
with left:
    st.plotly_chart(
        charts.compute_bars(
            [labels[r] for r in table["run_id"]],
            list(table["total_flops"]),
            list(table["wall_s"]),
            list(table["flop_saving"]),
            list(table["wall_saving"]),
            [run_colors[labels[r]] for r in table["run_id"]],
            title=f"Compute (savings against {item_labels[baseline]})",
        ),
        key="cmp_compute",
    )
with right:
    # feat_std (spread of layer-normalised features) is what falls to ~0 when latents collapse;
    # the centred effective rank can stay put, so both are offered.
    indicator = st.radio(
        "collapse indicator",
        ["feat_std", "eff_rank"],
        horizontal=True,
        key="cmp_collapse_metric",
        format_func={"feat_std": "feature std (min over blocks)", "eff_rank": "effective rank (mean over blocks)"}.get,
    )
    reduce = "min" if indicator == "feat_std" else "mean"
    collapse = {}
    for rid, frame in layer.items():
        rows = frame[frame["metric"] == indicator]
        if not rows.empty:
            collapse[labels[rid]] = rows.groupby("step", as_index=False)["value"].agg(reduce)
    st.caption(f"{indicator}: {metric_help(indicator)}")
    if collapse:
        st.plotly_chart(
            charts.lines(
                collapse,
                "step",
                "value",
                "step",
                f"{indicator} ({reduce} over blocks)",
                line_colors,
                title=f"Collapse indicator: {indicator}",
                height=340,
            ),
            key="cmp_collapse",
        )
    else:
        st.info(f"No {indicator} metrics logged for these runs.")

# ---------------------------------------------------------------------------- parameters
with st.expander("Parameters of the compared runs", expanded=False):
    only_differs = st.toggle("Only what differs", value=True, key="cmp_params_differ")
    with state.notice_errors():
        params = {run_labels[rid]: loaders.record(uri, rid).params for rid in run_labels}
    ptable = export.param_table(params, only_differs=only_differs)
    st.dataframe(ptable, hide_index=True, key="cmp_params_table")
    st.caption(f"{len(ptable)} parameters" + (" that are not the same in every run" if only_differs else ""))
    st.download_button(
        "Download parameters (CSV)", export.to_csv(ptable), file_name="parameters.csv", key="cmp_params_csv"
    )

# ---------------------------------------------------------------------------- per-block side by side
st.subheader("Per-block metrics side by side")
# One run per compared group (its lowest seed): nine heatmaps for three groups of three say no more.
first_runs = [ids[0] for ids in items.values()]
if any(len(ids) > 1 for ids in items.values()):
    st.caption("One run per group: the one with the lowest seed.")
names = []
with state.notice_errors():
    for rid in first_runs:
        _, ver = loaders.run_version(uri, rid)
        names += [n for n in loaders.block_metric_names(uri, rid, ver) if n not in names]
if not names:
    st.info("These runs have no per-block metrics.")
    st.stop()
state.seed("cmp_block_metric", names, "cka_init" if "cka_init" in names else names[0])
block_metric = st.selectbox("Per-block metric", names, key="cmp_block_metric")
wides = {}
with state.notice_errors():
    for rid in first_runs:
        _, ver = loaders.run_version(uri, rid)
        wides[labels[rid]] = loaders.metric_wide(uri, rid, ver, block_metric)
if all(w.empty for w in wides.values()):
    st.info(f"None of these runs logged {block_metric}.")
else:
    st.plotly_chart(charts.side_by_side_heatmaps(wides, block_metric), key="cmp_blocks")
    final = pd.DataFrame(
        [
            {"run": label, "block": charts.block_label(b), "value": float(w[b].dropna().iloc[-1])}
            for label, w in wides.items()
            if not w.empty
            for b in w.columns
            if w[b].notna().any()
        ]
    )
    if not final.empty and np.isfinite(final["value"]).any():
        st.plotly_chart(
            charts.grouped_bars(
                final,
                "block",
                "value",
                "run",
                title=f"{block_metric} at the last probe",
                y_title=block_metric,
                colors=line_colors,
            ),
            key="cmp_block_final",
        )
