"""Plotly figure builders: pure functions of DataFrames and dicts (no Streamlit, no MLflow).

Conventions: blocks are 0-based and labelled ``block 00``; x axes are training steps unless
named otherwise. Long series are averaged into at most ``max_steps`` bins for display (a
browser cannot show 5,000 heatmap columns in 1,000 pixels anyway); detected convergence steps
are always drawn at their exact step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

METHOD_COLORS = {
    "mae": "#1f77b4",
    "layerlock": "#ff7f0e",
    "latent_scheduled": "#9467bd",
    "latent_naive": "#d62728",
    "freeze_test": "#7f7f7f",
}
# Metrics bounded in [0, 1] get a fixed colour range so runs compare at a glance.
UNIT_METRICS = ("cka_prev", "cka_init", "cka_final")
HEIGHT = 380


def _layout(fig: go.Figure, title: str | None = None, height: int = HEIGHT, **kw: Any) -> go.Figure:
    fig.update_layout(
        title=title,
        height=height,
        margin={"l": 60, "r": 20, "t": 50 if title else 20, "b": 50},
        legend={"orientation": "h", "y": -0.2},
        **kw,
    )
    return fig


def block_label(block: int) -> str:
    return f"block {int(block):02d}"


def depth_colors(n: int) -> list[str]:
    """One colour per block, shallow (dark) to deep (bright)."""
    return sample_colorscale("Viridis", [i / max(n - 1, 1) for i in range(n)])


def bin_steps(wide: pd.DataFrame, max_steps: int) -> pd.DataFrame:
    """Average consecutive rows (steps) into at most ``max_steps`` bins, indexed by each bin's
    first step. Returns ``wide`` itself when it is short enough."""
    n = len(wide)
    if n <= max_steps:
        return wide
    size = math.ceil(n / max_steps)
    groups = np.arange(n) // size
    binned = wide.groupby(groups).mean()
    binned.index = wide.index.to_numpy()[::size][: len(binned)]
    binned.index.name = wide.index.name
    return binned


def _conv_points(wide: pd.DataFrame, conv: pd.Series | None) -> list[tuple[int, int, float]]:
    """``(block, step, value)`` for blocks with a detected convergence step present in ``wide``."""
    if conv is None:
        return []
    out = []
    for block, step in conv.items():
        if pd.isna(step) or block not in wide.columns:
            continue
        col = wide[block].dropna()
        if col.empty:
            continue
        # The rule may read another metric with other steps: use the nearest logged step.
        pos = int(np.abs(col.index.to_numpy() - int(step)).argmin())
        out.append((int(block), int(step), float(col.iloc[pos])))
    return out


def layer_heatmap(
    wide: pd.DataFrame,
    metric: str,
    conv: pd.Series | None = None,
    title: str | None = None,
    max_steps: int = 800,
    height: int = HEIGHT,
) -> go.Figure:
    """Layer x step heatmap of one per-block metric; detected convergence steps as markers."""
    shown = bin_steps(wide, max_steps)
    bounded = metric in UNIT_METRICS
    fig = go.Figure(
        go.Heatmap(
            z=shown.T.to_numpy(),
            x=shown.index.to_numpy(),
            y=[block_label(b) for b in shown.columns],
            colorscale="Viridis",
            zmin=0.0 if bounded else None,
            zmax=1.0 if bounded else None,
            colorbar={"title": {"text": metric}},
            hovertemplate="step %{x}<br>%{y}<br>" + metric + " %{z:.4g}<extra></extra>",
        )
    )
    points = _conv_points(wide, conv)
    if points:
        fig.add_trace(
            go.Scatter(
                x=[p[1] for p in points],
                y=[block_label(p[0]) for p in points],
                mode="markers",
                marker={"symbol": "x-thin", "size": 14, "line": {"width": 3, "color": "#ff2d55"}},
                name="converged",
                hovertemplate="%{y} converged at step %{x}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="step")
    return _layout(fig, title, height)


def block_curves(
    wide: pd.DataFrame,
    metric: str,
    conv: pd.Series | None = None,
    threshold: float | None = None,
    title: str | None = None,
    max_steps: int = 1500,
    log_y: bool = False,
    height: int = HEIGHT,
) -> go.Figure:
    """One line per block (shallow dark, deep bright), convergence steps starred."""
    shown = bin_steps(wide, max_steps)
    colors = depth_colors(len(shown.columns))
    fig = go.Figure()
    for color, block in zip(colors, shown.columns, strict=True):
        col = shown[block].dropna()
        fig.add_trace(
            go.Scatter(
                x=col.index.to_numpy(),
                y=col.to_numpy(),
                mode="lines",
                name=block_label(block),
                line={"color": color, "width": 1.6},
                legendgroup=str(block),
                hovertemplate=block_label(block) + " step %{x}: %{y:.4g}<extra></extra>",
            )
        )
    by_block = dict(zip(shown.columns, colors, strict=True))
    for block, step, value in _conv_points(wide, conv):
        fig.add_trace(
            go.Scatter(
                x=[step],
                y=[value],
                mode="markers",
                legendgroup=str(block),
                showlegend=False,
                marker={
                    "symbol": "star",
                    "size": 13,
                    "color": by_block.get(block, "#333"),
                    "line": {"width": 1, "color": "#000"},
                },
                hovertemplate=f"{block_label(block)} converged at step {step}<extra></extra>",
            )
        )
    if threshold is not None:
        fig.add_hline(y=threshold, line={"dash": "dot", "color": "#888"}, annotation_text=f"threshold {threshold:g}")
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text=metric, type="log" if log_y else None)
    return _layout(fig, title, height)


def convergence_order(conv: pd.Series, last_step: int | None = None, title: str | None = None) -> go.Figure:
    """Convergence step against depth (the order statistic, drawn); never-converged at the top."""
    blocks = [int(b) for b in conv.index]
    steps = [None if pd.isna(s) else int(s) for s in conv.to_numpy()]
    top = last_step if last_step is not None else max([s for s in steps if s is not None] or [0])
    fig = go.Figure(
        go.Bar(
            x=[block_label(b) for b in blocks],
            y=[top if s is None else s for s in steps],
            marker={
                "color": ["#cccccc" if s is None else c for s, c in zip(steps, depth_colors(len(blocks)), strict=True)]
            },
            text=["never" if s is None else str(s) for s in steps],
            textposition="outside",
            hovertemplate="%{x}: %{text}<extra></extra>",
        )
    )
    fig.update_yaxes(title_text="convergence step")
    return _layout(fig, title, 300)


# ----------------------------------------------------------------------------- a group of seeds


def _steps_text(row: Mapping[str, Any]) -> str:
    """``"1,234 [1,100, 1,370] over 3 of 3 runs"`` for one row of ``group_steps``."""
    if row["n"] == 0 or row["mean"] is None or pd.isna(row["mean"]):
        return f"never (0 of {row['n_runs']} runs)"
    low, high = row["ci_low"], row["ci_high"]
    interval = "" if low is None or pd.isna(low) else f" [{low:,.0f}, {high:,.0f}]"
    return f"{row['mean']:,.0f}{interval} over {row['n']} of {row['n_runs']} runs"


def _group_points(mean: pd.DataFrame, steps: pd.DataFrame | None) -> list[tuple[int, float, float, str]]:
    """``(block, mean step, value at the nearest common step, hover text)`` of blocks that converged in a run."""
    if steps is None or steps.empty:
        return []
    out = []
    values, xs, where = mean.to_numpy(dtype=float), mean.index.to_numpy(), {b: j for j, b in enumerate(mean.columns)}
    for row in steps.to_dict("records"):
        j = where.get(row["block"])
        if not row["n"] or j is None or not np.isfinite(values[:, j]).any():
            continue
        ok = np.isfinite(values[:, j])
        pos = int(np.abs(xs[ok] - float(row["mean"])).argmin())
        out.append((int(row["block"]), float(row["mean"]), float(values[ok, j][pos]), _steps_text(row)))
    return out


def group_heatmap(
    wide: Mapping[str, pd.DataFrame],
    metric: str,
    steps: pd.DataFrame | None = None,
    title: str | None = None,
    max_steps: int = 800,
    height: int = HEIGHT,
) -> go.Figure:
    """Layer x step heatmap of a group's mean (``analysis.convergence.mean_over_runs``); the hover
    shows the sd and min..max over the runs (averaged into the displayed step bins, like the
    mean); each block's mean convergence step as a marker, its 95% interval on hover."""
    mean = bin_steps(wide["mean"], max_steps)
    spread = np.stack(
        [bin_steps(wide[k], max_steps).T.to_numpy() for k in ("sd", "lo", "hi")], axis=-1
    )  # block x step x (sd, lo, hi)
    bounded = metric in UNIT_METRICS
    fig = go.Figure(
        go.Heatmap(
            z=mean.T.to_numpy(),
            x=mean.index.to_numpy(),
            y=[block_label(b) for b in mean.columns],
            customdata=np.round(spread, 5),
            colorscale="Viridis",
            zmin=0.0 if bounded else None,
            zmax=1.0 if bounded else None,
            colorbar={"title": {"text": f"mean {metric}"}},
            hovertemplate="step %{x}<br>%{y}<br>mean "
            + metric
            + " %{z:.4g}<br>sd %{customdata[0]:.3g}<br>min..max %{customdata[1]:.4g}..%{customdata[2]:.4g}"
            + "<extra></extra>",
        )
    )
    points = _group_points(wide["mean"], steps)
    if points:
        fig.add_trace(
            go.Scatter(
                x=[p[1] for p in points],
                y=[block_label(p[0]) for p in points],
                mode="markers",
                marker={"symbol": "x-thin", "size": 14, "line": {"width": 3, "color": "#ff2d55"}},
                name="converged (mean step)",
                text=[p[3] for p in points],
                hovertemplate="%{y} converged at step %{text}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="step")
    return _layout(fig, title, height)


def group_block_curves(
    wide: Mapping[str, pd.DataFrame],
    metric: str,
    steps: pd.DataFrame | None = None,
    threshold: float | None = None,
    band: str = "min..max",
    title: str | None = None,
    max_steps: int = 1000,
    log_y: bool = False,
    height: int = HEIGHT,
) -> go.Figure:
    """Per block the group's mean (a line) in a shaded band (``"min..max"`` over the runs, or
    ``"sd"``: mean ± sd); each block's mean convergence step starred, with its 95% interval as
    a horizontal error bar."""
    mean = bin_steps(wide["mean"], max_steps)
    if band == "sd":
        sd = bin_steps(wide["sd"], max_steps).fillna(0.0)
        lo, hi = mean - sd, mean + sd
    else:
        lo, hi = bin_steps(wide["lo"], max_steps), bin_steps(wide["hi"], max_steps)
    colors = depth_colors(len(mean.columns))
    xs = mean.index.to_numpy()
    m, low, high = (f.to_numpy(dtype=float) for f in (mean, lo, hi))  # numpy columns: 12 blocks, 3 frames
    fig = go.Figure()
    for j, (color, block) in enumerate(zip(colors, mean.columns, strict=True)):
        ok = np.isfinite(m[:, j])
        x = xs[ok]
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([x, x[::-1]]),
                y=np.concatenate([high[ok, j], low[ok, j][::-1]]),
                fill="toself",
                fillcolor=_rgba(color, 0.15),
                line={"width": 0},
                mode="lines",
                legendgroup=str(block),
                showlegend=False,
                name=f"{block_label(block)} ({band})",
                hoverinfo="skip",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=m[ok, j],
                mode="lines",
                name=block_label(block),
                line={"color": color, "width": 1.6},
                legendgroup=str(block),
                hovertemplate=block_label(block) + " step %{x}: mean %{y:.4g}<extra></extra>",
            )
        )
    by_block = dict(zip(mean.columns, colors, strict=True))
    rows = {} if steps is None else {int(r["block"]): r for r in steps.to_dict("records")}
    for block, step, value, text in _group_points(wide["mean"], steps):
        row = rows[block]
        has_ci = row["ci_low"] is not None and not pd.isna(row["ci_low"])
        fig.add_trace(
            go.Scatter(
                x=[step],
                y=[value],
                mode="markers",
                legendgroup=str(block),
                showlegend=False,
                marker={
                    "symbol": "star",
                    "size": 13,
                    "color": by_block.get(block, "#333"),
                    "line": {"width": 1, "color": "#000"},
                },
                error_x={
                    "type": "data",
                    "symmetric": False,
                    "array": [row["ci_high"] - step if has_ci else 0.0],
                    "arrayminus": [step - row["ci_low"] if has_ci else 0.0],
                    "color": by_block.get(block, "#333"),
                    "visible": has_ci,
                },
                hovertemplate=f"{block_label(block)} converged at step {text}<extra></extra>",
            )
        )
    if threshold is not None:
        fig.add_hline(y=threshold, line={"dash": "dot", "color": "#888"}, annotation_text=f"threshold {threshold:g}")
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text=f"mean {metric}", type="log" if log_y else None)
    return _layout(fig, title, height)


def group_convergence_order(
    steps: pd.DataFrame, run_labels: Mapping[str, str] | None = None, last_step: int | None = None, title=None
) -> go.Figure:
    """Each block's mean convergence step over the runs, its 95% interval as an error bar and
    each run's own step as a dot; blocks that never converged in any run are grey, at the top.

    ``steps``: :func:`analysis.convergence.group_steps`; ``run_labels``: its run columns -> label."""
    labels = dict(run_labels or {})
    blocks = [int(b) for b in steps["block"]]
    means = [None if not n else float(m) for m, n in zip(steps["mean"], steps["n"], strict=True)]
    finite = [m for m in means if m is not None]
    top = last_step if last_step is not None else max(finite or [0])
    has_ci = [lo is not None and not pd.isna(lo) for lo in steps["ci_low"]]
    fig = go.Figure(
        go.Bar(
            x=[block_label(b) for b in blocks],
            y=[top if m is None else m for m in means],
            marker={
                "color": ["#cccccc" if m is None else c for m, c in zip(means, depth_colors(len(blocks)), strict=True)]
            },
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [hi - m if ok else 0.0 for hi, m, ok in zip(steps["ci_high"], means, has_ci, strict=True)],
                "arrayminus": [m - lo if ok else 0.0 for lo, m, ok in zip(steps["ci_low"], means, has_ci, strict=True)],
                "color": "#444",
            },
            text=[_steps_text(r) for r in steps.to_dict("records")],
            textposition="none",  # on hover only: the interval text is too long for a bar
            hovertemplate="%{x}: %{text}<extra></extra>",
            name="mean, 95% interval",
        )
    )
    for column, label in labels.items():
        if column not in steps.columns:
            continue
        values = pd.to_numeric(steps[column], errors="coerce").astype(float)
        ok = values.notna().to_numpy()
        fig.add_trace(
            go.Scatter(
                x=[block_label(b) for b, k in zip(blocks, ok, strict=True) if k],
                y=values[ok].to_numpy(),
                mode="markers",
                marker={"size": 7, "color": "#000", "opacity": 0.55, "symbol": "circle-open"},
                name=label,
                hovertemplate=f"{label}: %{{x}} converged at step %{{y:.0f}}<extra></extra>",
            )
        )
    fig.update_yaxes(title_text="convergence step")
    return _layout(fig, title, 320, showlegend=bool(labels))


def frozen_steps(
    schedule: Mapping[str, Any],
    total_steps: int,
    actual: pd.Series | None = None,
    conv: pd.Series | None = None,
    title: str | None = None,
) -> go.Figure:
    """Frozen-prefix length over training: the schedule as a step function, optionally the
    run's logged ``train/frozen_blocks`` and the per-block convergence steps."""
    xs, ys = [0], [0]
    for stage in schedule.get("stages", []):
        xs += [int(stage["step"])]
        ys += [int(stage["frozen"])]
    xs.append(int(total_steps))
    ys.append(ys[-1])
    fig = go.Figure(
        go.Scatter(
            x=xs,
            y=ys,
            mode="lines+markers",
            line={"shape": "hv", "width": 3, "color": "#ff7f0e"},
            name="schedule (frozen blocks)",
            hovertemplate="from step %{x}: %{y} frozen<extra></extra>",
        )
    )
    if actual is not None and len(actual):
        fig.add_trace(
            go.Scatter(
                x=actual.index.to_numpy(),
                y=actual.to_numpy(),
                mode="lines",
                line={"shape": "hv", "dash": "dot", "color": "#1f77b4"},
                name="this run's train/frozen_blocks",
            )
        )
    if conv is not None:
        pts = [(int(b), int(s)) for b, s in conv.items() if not pd.isna(s)]
        if pts:
            fig.add_trace(
                go.Scatter(
                    x=[s for _, s in pts],
                    y=[b + 1 for b, _ in pts],
                    mode="markers",
                    marker={"symbol": "star", "size": 11, "color": "#2ca02c"},
                    name="block b converged (plotted at b+1)",
                    hovertemplate="block %{customdata} converged at step %{x}<extra></extra>",
                    customdata=[b for b, _ in pts],
                )
            )
    n_blocks = int(schedule.get("n_blocks", max(ys) + 1))
    fig.update_xaxes(title_text="step", range=[0, total_steps])
    fig.update_yaxes(title_text="frozen blocks", range=[-0.2, n_blocks + 0.2], dtick=1)
    return _layout(fig, title, 340)


def lines(
    series: Mapping[str, pd.DataFrame],
    x: str,
    y: str,
    x_title: str,
    y_title: str,
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    log_y: bool = False,
    height: int = HEIGHT,
) -> go.Figure:
    """One line per entry of ``series`` (label -> frame with columns ``x`` and ``y``)."""
    fig = go.Figure()
    for label, frame in series.items():
        if frame.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=frame[x].to_numpy(),
                y=frame[y].to_numpy(),
                mode="lines",
                name=label,
                line={"color": (colors or {}).get(label)},
                hovertemplate=label + "<br>" + x_title + " %{x:.4g}<br>" + y_title + " %{y:.4g}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title, type="log" if log_y else None)
    return _layout(fig, title, height)


def _rgba(color: str, alpha: float) -> str:
    """``#rrggbb`` or ``rgb(r, g, b)`` -> ``rgba(r, g, b, alpha)``."""
    if color.startswith("#") and len(color) == 7:
        r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    else:
        r, g, b = (int(float(v)) for v in color[color.index("(") + 1 : color.index(")")].split(",")[:3])
    return f"rgba({r}, {g}, {b}, {alpha})"


def band_lines(
    groups: Mapping[str, pd.DataFrame],
    runs: Mapping[str, Mapping[str, pd.DataFrame]],
    x_title: str,
    y_title: str,
    colors: Mapping[str, str],
    band: str = "min..max",
    title: str | None = None,
    log_y: bool = False,
    height: int = HEIGHT,
) -> go.Figure:
    """One curve per group of seeds: the mean as a line, a shaded band, and each run faint.

    ``groups``: label -> frame of :func:`analysis.stats.spread_over_runs` (``x, mean, lo, hi,
    sd, n``); ``band`` is ``"min..max"`` (``lo``..``hi``) or ``"sd"`` (mean ± sd). ``runs``:
    label -> run label -> frame with ``x, y``. A group of one run has no band and no faint lines.
    """
    fig = go.Figure()
    for label, curve in groups.items():
        if curve.empty:
            continue
        color = colors.get(label) or "#1f77b4"
        members = runs.get(label, {})
        if len(members) > 1:
            lo, hi = (
                (curve["lo"], curve["hi"])
                if band == "min..max"
                else (curve["mean"] - curve["sd"].fillna(0), curve["mean"] + curve["sd"].fillna(0))
            )
            xs = curve["x"].to_numpy()
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([xs, xs[::-1]]),
                    y=np.concatenate([hi.to_numpy(), lo.to_numpy()[::-1]]),
                    fill="toself",
                    fillcolor=_rgba(color, 0.18),
                    line={"width": 0},
                    mode="lines",
                    name=f"{label} ({band})",
                    legendgroup=label,
                    hoverinfo="skip",
                )
            )
            for run_label, frame in members.items():
                if frame.empty:
                    continue
                fig.add_trace(
                    go.Scatter(
                        x=frame["x"].to_numpy(),
                        y=frame["y"].to_numpy(),
                        mode="lines",
                        legendgroup=label,
                        showlegend=False,
                        line={"color": _rgba(color, 0.35), "width": 1},
                        hovertemplate=run_label
                        + "<br>"
                        + x_title
                        + " %{x:.4g}<br>"
                        + y_title
                        + " %{y:.4g}<extra></extra>",
                    )
                )
        fig.add_trace(
            go.Scatter(
                x=curve["x"].to_numpy(),
                y=curve["mean"].to_numpy(),
                mode="lines",
                legendgroup=label,
                name=f"{label} (mean)" if len(members) > 1 else label,
                line={"color": color, "width": 2.2},
                customdata=curve["n"].to_numpy(),
                hovertemplate=label
                + "<br>"
                + x_title
                + " %{x:.4g}<br>mean "
                + y_title
                + " %{y:.4g} over %{customdata} run(s)<extra></extra>",
            )
        )
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title, type="log" if log_y else None)
    return _layout(fig, title, height)


def side_by_side_heatmaps(
    wides: Mapping[str, pd.DataFrame], metric: str, max_steps: int = 400, title: str | None = None
) -> go.Figure:
    """One layer x step heatmap per run, side by side, on a shared colour scale."""
    labels = [k for k, v in wides.items() if not v.empty]
    cols = max(1, min(len(labels), 3))
    rows = max(1, math.ceil(len(labels) / cols))
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=labels, horizontal_spacing=0.06, vertical_spacing=0.18 if rows > 1 else 0.1
    )
    values = [w.to_numpy() for w in wides.values() if not w.empty]
    if metric in UNIT_METRICS:
        zmin, zmax = 0.0, 1.0
    elif values:
        finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([0.0])
        zmin, zmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    else:
        zmin, zmax = 0.0, 1.0
    for i, label in enumerate(labels):
        shown = bin_steps(wides[label], max_steps)
        fig.add_trace(
            go.Heatmap(
                z=shown.T.to_numpy(),
                x=shown.index.to_numpy(),
                y=[block_label(b) for b in shown.columns],
                colorscale="Viridis",
                zmin=zmin,
                zmax=zmax,
                showscale=i == 0,
                colorbar={"title": {"text": metric}},
                hovertemplate=label + "<br>step %{x}<br>%{y}<br>%{z:.4g}<extra></extra>",
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    return _layout(fig, title, 320 * rows)


def grouped_bars(
    frame: pd.DataFrame,
    x: str,
    y: str,
    color: str,
    title: str | None = None,
    y_title: str | None = None,
    colors: Mapping[str, str] | None = None,
    height: int = 320,
) -> go.Figure:
    """Bars of ``y`` per ``x``, one group per value of ``color``."""
    fig = go.Figure()
    for key, part in frame.groupby(color, sort=False):
        fig.add_trace(
            go.Bar(x=part[x].astype(str), y=part[y], name=str(key), marker={"color": (colors or {}).get(str(key))})
        )
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text=y_title or y)
    return _layout(fig, title, height)


def freeze_grid_heatmap(
    ratio: pd.DataFrame, converged: pd.DataFrame, tol: float, title: str | None = None
) -> go.Figure:
    """The paper's L x T grid: final loss / baseline per (frozen blocks L, freeze step T)."""
    z = ratio.to_numpy(dtype=float)
    text = []
    for i in range(ratio.shape[0]):
        row = []
        for j in range(ratio.shape[1]):
            r, ok = z[i, j], converged.iloc[i, j]
            if pd.isna(ok):
                row.append("")
            else:
                row.append(("✓ " if bool(ok) else "✗ ") + ("n/a" if np.isnan(r) else f"{r:.3f}"))
        text.append(row)
    finite = z[np.isfinite(z)]
    spread = max(float(np.abs(finite - 1.0).max()) if finite.size else 0.0, 2 * tol, 1e-3)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(int(t)) for t in ratio.columns],
            y=[f"L={int(b)}" for b in ratio.index],
            text=text,
            texttemplate="%{text}",
            colorscale="RdYlGn",
            reversescale=True,
            zmid=1.0,
            zmin=1.0 - spread,
            zmax=1.0 + spread,
            colorbar={"title": {"text": "loss / baseline"}},
            hovertemplate="freeze %{y} at step T=%{x}<br>final loss / baseline %{z:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="freeze step T", type="category")
    fig.update_yaxes(title_text="frozen blocks L", type="category")
    return _layout(fig, title, max(300, 70 * ratio.shape[0] + 120))


def attribution_bars(blocks: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Per-block share of |attribution| (the signed totals are equal by completeness, so not drawn)."""
    labels = [block_label(b) for b in blocks["block"]]
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=blocks["abs_share"],
            marker={"color": depth_colors(len(labels))},
            text=[f"{v:.0%}" for v in blocks["abs_share"]],
            textposition="auto",
            customdata=blocks["total"],
            hovertemplate="%{x}: %{y:.1%} of |attribution|<br>signed total %{customdata:.4g}<extra></extra>",
        )
    )
    fig.update_yaxes(title_text="share of |attribution|", tickformat=".0%")
    return _layout(fig, title, 340)


def attribution_over_time(block_time: np.ndarray, title: str | None = None) -> go.Figure:
    """``block_time (n_blocks, T_tokens)``: where in time each block's attribution sits."""
    fig = go.Figure(
        go.Heatmap(
            z=block_time,
            x=[f"t{t}" for t in range(block_time.shape[1])],
            y=[block_label(b) for b in range(block_time.shape[0])],
            colorscale="Magma",
            colorbar={"title": {"text": "share"}},
            hovertemplate="%{y}, token time %{x}: %{z:.1%}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="token time slice")
    return _layout(fig, title, 300)


def saliency_frames(
    frames: np.ndarray, saliency: np.ndarray, title: str | None = None, alpha: float = 0.65
) -> go.Figure:
    """Clip frames (top) and the saliency over them (bottom).

    ``frames (T, H, W, 3)`` in [0, 1]; ``saliency (T, H, W)`` non-negative (normalised here by its
    maximum over the clip, so frames compare).
    """
    t = frames.shape[0]
    sal = saliency / max(float(saliency.max()), 1e-12)
    heat = np.stack([np.ones_like(sal), 0.85 * (1 - sal), np.zeros_like(sal)], axis=-1)  # yellow -> red
    weight = (alpha * sal)[..., None]
    overlay = frames * (1 - weight) + heat * weight
    fig = make_subplots(
        rows=2, cols=t, horizontal_spacing=0.01, vertical_spacing=0.04, subplot_titles=[f"frame {i}" for i in range(t)]
    )
    for i in range(t):
        fig.add_trace(go.Image(z=(frames[i] * 255).astype(np.uint8), hoverinfo="skip"), row=1, col=i + 1)
        fig.add_trace(
            go.Image(
                z=(np.clip(overlay[i], 0, 1) * 255).astype(np.uint8),
                customdata=sal[i],
                hovertemplate="saliency %{customdata:.2f}<extra></extra>",
            ),
            row=2,
            col=i + 1,
        )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    for row, text in ((1, "clip"), (2, "saliency")):
        fig.update_yaxes(
            title_text=text, visible=True, showticklabels=False, showgrid=False, zeroline=False, row=row, col=1
        )
    return _layout(fig, title, int(min(520, 120 + 2 * 900 / max(t, 1))))


def compute_bars(
    labels: list[str],
    flops: list[float],
    wall_s: list[float],
    flop_saving: list[float],
    wall_saving: list[float],
    colors: list[str | None] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Total counted FLOPs (top) and wall time (bottom) per run, each bar labelled with its saving."""

    def note(value: float, saving: float, unit: str) -> str:
        if value is None or not np.isfinite(value):
            return "n/a"
        text = f"{value:.3g} {unit}"
        if saving is not None and np.isfinite(saving):
            text += " · baseline" if saving == 0 else f" · {abs(saving):.1%} {'less' if saving > 0 else 'more'}"
        return text

    fig = make_subplots(
        rows=2, cols=1, vertical_spacing=0.22, subplot_titles=["counted training FLOPs", "training wall time"]
    )
    for row, (values, savings, unit) in enumerate(((flops, flop_saving, "FLOP"), (wall_s, wall_saving, "s")), 1):
        fig.add_trace(
            go.Bar(
                y=labels,
                x=values,
                orientation="h",
                marker={"color": colors},
                showlegend=False,
                text=[note(v, s, unit) for v, s in zip(values, savings, strict=True)],
                textposition="auto",
                insidetextanchor="start",
                hovertemplate="%{y}<br>%{x:.4g} " + unit + "<extra></extra>",
            ),
            row=row,
            col=1,
        )
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, 160 + 70 * len(labels))


def bars(
    x: list, y: list, x_title: str, y_title: str, title: str | None = None, color: str = "#2ca02c", height: int = 300
) -> go.Figure:
    fig = go.Figure(
        go.Bar(x=[str(v) for v in x], y=y, marker={"color": color}, text=[str(v) for v in y], textposition="auto")
    )
    fig.update_xaxes(title_text=x_title, type="category")
    fig.update_yaxes(title_text=y_title)
    return _layout(fig, title, height)
