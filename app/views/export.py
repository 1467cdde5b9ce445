"""CSV exports of what the pages show: pure functions from frames to CSV bytes (no Streamlit).

Floats are written at full precision (pandas writes each float as its shortest round-trip repr),
so a value read back with ``pandas.read_csv`` equals the one in the store bit for bit. Curves are
exported as plotted: each row says the smoothing it was drawn with (``smoothing`` column).
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd


def to_csv(frame: pd.DataFrame) -> bytes:
    """``frame`` as UTF-8 CSV without the index; float formatting left to pandas (full precision)."""
    return frame.to_csv(index=False).encode("utf-8")


def curves_frame(
    groups: Mapping[str, pd.DataFrame],
    members: Mapping[str, Mapping[str, pd.DataFrame]],
    y_name: str,
    x_name: str,
    smoothing: int,
) -> pd.DataFrame:
    """The Compare page's curves as plotted, long: ``curve, kind, run, step, x, y, sd, lo, hi, n,
    y_metric, x_axis, smoothing``. ``kind`` is ``run`` (one run's smoothed curve) or ``group_mean``
    (the mean over the group's runs, with sd/min/max/N); ``smoothing`` says how ``y`` was smoothed."""
    parts = []
    note = "none" if smoothing <= 1 else f"rolling mean over {smoothing} logged points"
    for label, curve in groups.items():
        runs = members.get(label, {})
        for run, frame in runs.items():
            parts.append(frame[["step", "x", "y"]].assign(curve=label, kind="run", run=run))
        if len(runs) > 1 and not curve.empty:
            parts.append(
                curve.rename(columns={"mean": "y", "lo": "lo", "hi": "hi"})[
                    ["step", "x", "y", "sd", "lo", "hi", "n"]
                ].assign(curve=label, kind="group_mean", run="")
            )
    columns = ["curve", "kind", "run", "step", "x", "y", "sd", "lo", "hi", "n"]
    if not parts:
        return pd.DataFrame(columns=[*columns, "y_metric", "x_axis", "smoothing"])
    out = pd.concat(parts, ignore_index=True).reindex(columns=columns)
    return out.assign(y_metric=y_name, x_axis=x_name, smoothing=note)


def param_table(params: Mapping[str, Mapping[str, str]], only_differs: bool = False) -> pd.DataFrame:
    """``param`` rows x one column per run (label -> its params); ``only_differs`` keeps the params
    whose values are not the same in every run (a param missing from a run counts as differing)."""
    labels = list(params)
    keys = sorted({k for p in params.values() for k in p})
    rows = []
    for key in keys:
        values = [params[label].get(key) for label in labels]
        if only_differs and len(labels) > 1 and len(set(values)) == 1:
            continue
        rows.append({"param": key, **dict(zip(labels, values, strict=True))})
    return pd.DataFrame(rows, columns=["param", *labels])


def block_metrics_frame(layer: pd.DataFrame) -> pd.DataFrame:
    """A run's per-block metrics, tidy and sorted: ``metric, block, step, value``."""
    cols = ["metric", "block", "step", "value"]
    if layer.empty:
        return pd.DataFrame(columns=cols)
    return layer[cols].sort_values(cols[:3], kind="stable").reset_index(drop=True)
