"""Compare: loss against step, FLOPs and wall time; per-block metrics side by side; evaluation
table; compute saved; collapse indicators."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analysis import io
from analysis.compare import comparison_frame, summarize_run
from app.views import charts, loaders, state

HISTORY_KEYS = ("train/loss", "train/loss_pixel", "train/loss_latent", "train/flops", "train/wall_s")
X_AXES = {"step": ("step", "step"), "FLOPs": ("train/flops", "counted FLOPs"),
          "wall time": ("train/wall_s", "wall time (s)")}

st.title("Compare runs")
uri = state.tracking_uri()
runs = state.load_runs()
chosen = state.pick_runs(runs, key="cmp_runs", label="Runs to compare",
                         help="Savings are measured against the first MAE run in this list")
if not chosen:
    st.info("Choose one or more runs to compare.")
    st.stop()

labels, colors, rows, histories, layer = {}, {}, [], {}, {}
with state.notice_errors():
    for rid in chosen:
        rec, ver = loaders.run_version(uri, rid)
        label = f"{rec.name or rid[:8]} ({rec.method or '?'})"
        if label in labels.values():
            label = f"{label} {rid[:6]}"
        labels[rid] = label
        colors[rid] = charts.METHOD_COLORS.get(rec.method or "")
        histories[rid] = loaders.history(uri, rid, ver, HISTORY_KEYS)
        layer[rid] = loaders.layer_metrics(uri, rid, ver, ("eff_rank", "feat_std"))
        meta = {"run_id": rid, "name": rec.name, "method": rec.method, "dataset": rec.dataset,
                "status": rec.status, "steps": rec.param_int("train.steps")}
        rows.append(summarize_run(meta, histories[rid], layer[rid], io.eval_metrics(rec.metrics)))
        if rec.status == "FAILED":
            st.warning(f"{label} failed: {rec.tags.get(io.TAG_FAILURE, 'no reason recorded')}")
table = comparison_frame(rows)
line_colors = {labels[r]: colors[r] for r in chosen}
if len(set(line_colors.values())) < len(line_colors):
    line_colors = {}  # several runs of one method: let Plotly tell them apart

# ---------------------------------------------------------------------------- loss curves
c = st.columns([2, 2, 2, 1])
x_name = c[0].radio("x axis", list(X_AXES), horizontal=True, key="cmp_x")
loss_keys = [k for k in HISTORY_KEYS[:3] if any((h["metric"] == k).any() for h in histories.values())]
if not loss_keys:
    st.info("None of these runs has logged a loss yet.")
    st.stop()
state.seed("cmp_loss", loss_keys, "train/loss")
loss_key = c[1].selectbox("Loss", loss_keys, key="cmp_loss")
smooth = c[2].slider("smoothing (logged points)", 1, 50, 1, key="cmp_smooth")
log_y = c[3].toggle("log y", value=False, key="cmp_logy")

x_key, x_title = X_AXES[x_name]
series = {}
for rid, hist in histories.items():
    wide = hist.pivot_table(index="step", columns="metric", values="value", aggfunc="last")
    if loss_key not in wide.columns or (x_key != "step" and x_key not in wide.columns):
        continue
    y = wide[loss_key].rolling(smooth, min_periods=1).mean()
    x = pd.Series(wide.index.to_numpy(), index=wide.index) if x_key == "step" else wide[x_key]
    series[labels[rid]] = pd.DataFrame({"x": x.to_numpy(), "y": y.to_numpy()}).dropna()
missing = [labels[r] for r in chosen if labels[r] not in series]
if missing:
    st.caption(f"Not plotted (no {loss_key} or {x_key}): {', '.join(missing)}")
st.plotly_chart(charts.lines(series, "x", "y", x_title, loss_key, line_colors, log_y=log_y,
                             title=f"{loss_key} against {x_name}"), key="cmp_loss_chart")

# ---------------------------------------------------------------------------- table and compute
st.subheader("Summary")
eval_cols = [col for col in table.columns if col.startswith("eval/")]
shown = table.assign(run=[labels[r] for r in table["run_id"]])
st.dataframe(
    shown[["run", "method", "status", "steps", "final_loss", "final_loss_pixel", "total_flops", "wall_s",
           "flop_saving", "wall_saving", "eff_rank_mean", "eff_rank_min", "feat_std_mean", "feat_std_min",
           *eval_cols]],
    hide_index=True, key="cmp_table",
    column_config={
        "final_loss": st.column_config.NumberColumn("final loss", format="%.4f"),
        "final_loss_pixel": st.column_config.NumberColumn("final pixel loss", format="%.4f"),
        "total_flops": st.column_config.NumberColumn("FLOPs", format="%.3e"),
        "wall_s": st.column_config.NumberColumn("wall s", format="%.1f"),
        "flop_saving": st.column_config.NumberColumn("FLOP saving", format="percent"),
        "wall_saving": st.column_config.NumberColumn("time saving", format="percent"),
        "eff_rank_mean": st.column_config.NumberColumn("eff. rank (mean)", format="%.2f"),
        "eff_rank_min": st.column_config.NumberColumn("eff. rank (min)", format="%.2f"),
        "feat_std_mean": st.column_config.NumberColumn("feature std (mean)", format="%.3f"),
        "feat_std_min": st.column_config.NumberColumn("feature std (min)", format="%.3f",
                                                      help="spread of layer-normalised features; near 0: collapsed"),
        **{col: st.column_config.NumberColumn(col.removeprefix("eval/"), format="%.3f") for col in eval_cols},
    },
)
if not (table["method"] == "mae").any():
    st.caption("No MAE run in the list, so savings have no baseline.")
if eval_cols:
    evals = shown.melt(id_vars=["run"], value_vars=eval_cols, var_name="metric", value_name="value").dropna()
    evals["metric"] = evals["metric"].str.removeprefix("eval/")
    st.plotly_chart(charts.grouped_bars(evals, "metric", "value", "run", y_title="value", colors=line_colors,
                                        title="Downstream probes (eval/<task>/<metric>)"), key="cmp_evals")
else:
    st.caption("No evaluation metrics yet: `python -m experiments evaluate --run RUN_ID` adds eval/<task>/<metric>.")

left, right = st.columns(2)
with left:
    st.plotly_chart(charts.compute_bars([labels[r] for r in table["run_id"]], list(table["total_flops"]),
                                        list(table["wall_s"]), list(table["flop_saving"]), list(table["wall_saving"]),
                                        [colors[r] for r in table["run_id"]], title="Compute"),
                    key="cmp_compute")
with right:
    # feat_std (spread of layer-normalised features) is what falls to ~0 when latents collapse;
    # the centred effective rank can stay put, so both are offered.
    indicator = st.radio("collapse indicator", ["feat_std", "eff_rank"], horizontal=True, key="cmp_collapse_metric",
                         format_func={"feat_std": "feature std (min over blocks)",
                                      "eff_rank": "effective rank (mean over blocks)"}.get)
    reduce = "min" if indicator == "feat_std" else "mean"
    collapse = {}
    for rid, frame in layer.items():
        rows = frame[frame["metric"] == indicator]
        if not rows.empty:
            collapse[labels[rid]] = rows.groupby("step", as_index=False)["value"].agg(reduce)
    if collapse:
        st.plotly_chart(charts.lines(collapse, "step", "value", "step", f"{indicator} ({reduce} over blocks)",
                                     line_colors, title=f"Collapse indicator: {indicator}", height=340),
                        key="cmp_collapse")
    else:
        st.info(f"No {indicator} metrics logged for these runs.")

# ---------------------------------------------------------------------------- per-block side by side
st.subheader("Per-block metrics side by side")
names = []
with state.notice_errors():
    for rid in chosen:
        _, ver = loaders.run_version(uri, rid)
        names += [n for n in loaders.block_metric_names(uri, rid, ver) if n not in names]
if not names:
    st.info("These runs have no per-block metrics.")
    st.stop()
state.seed("cmp_block_metric", names, "cka_init" if "cka_init" in names else names[0])
block_metric = st.selectbox("Per-block metric", names, key="cmp_block_metric")
wides = {}
with state.notice_errors():
    for rid in chosen:
        _, ver = loaders.run_version(uri, rid)
        wides[labels[rid]] = loaders.metric_wide(uri, rid, ver, block_metric)
if all(w.empty for w in wides.values()):
    st.info(f"None of these runs logged {block_metric}.")
else:
    st.plotly_chart(charts.side_by_side_heatmaps(wides, block_metric), key="cmp_blocks")
    final = pd.DataFrame([
        {"run": label, "block": charts.block_label(b), "value": float(w[b].dropna().iloc[-1])}
        for label, w in wides.items() if not w.empty for b in w.columns if w[b].notna().any()
    ])
    if not final.empty and np.isfinite(final["value"]).any():
        st.plotly_chart(charts.grouped_bars(final, "block", "value", "run", title=f"{block_metric} at the last probe",
                                            y_title=block_metric, colors=line_colors), key="cmp_block_final")
