"""Dashboard render time for a large run: ``python -m app.bench [--json]``.

Creates, in a temporary store, a synthetic finished run of ``--blocks`` (12) blocks with every
per-block metric logged at ``--steps`` (5,000) steps (7 metrics x 12 blocks x 5,001 steps, about
420k values, stored the way the trainer stores a finished run: the ``layer_metrics.parquet``
artifact plus each key's latest value), then renders the Convergence page with Streamlit's
AppTest (``app/Home.py`` -> ``screens/convergence.py``) and reports:

- ``first``: the very first visit in this process -- the Runs page, then Convergence -- with the
  imports of the app, plotly and scipy on the way (mlflow is already imported by the setup);
- ``cold``: every ``st.cache_data`` cache cleared, a new session, the page rendered (data read
  from the store, convergence detected, figures built and serialised);
- ``warm``: the same page rendered again, in the same session and in a new session;
- a breakdown of the cold path (store read, step x block table, detection, figures).

It lives in ``app`` because it measures the dashboard (``experiments`` never imports ``app``).

Targets (issue 7): cold < 2 s, warm < 0.5 s. Render time is server side (script run plus
serialising the page); the browser's drawing is not included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HOME = str(ROOT / "app" / "Home.py")
COLD_TARGET_S, WARM_TARGET_S = 2.0, 0.5


def make_run(uri: str, blocks: int, steps: int) -> str:
    """A finished synthetic run of the given size; returns its id."""
    from mlflow.entities import Metric

    from analysis import io
    from analysis.testing import (
        create_run_from_frames,
        synthetic_flop_model,
        synthetic_history,
        synthetic_layer_metrics,
    )

    conv = [int(steps * (0.15 + 0.6 * b / blocks)) for b in range(blocks - 2)] + [None, None]
    layer_df = synthetic_layer_metrics(conv, total_steps=steps, probe_every=1, log_every=1)
    model = synthetic_flop_model(blocks)
    history = synthetic_history(steps, 1, model)
    run_id = create_run_from_frames(
        "bench",
        uri=uri,
        layer_df=layer_df,
        layer_history=False,
        history=history,
        params={"model.depth": blocks, "train.steps": steps, "probe.every": 1},
        tags={io.TAG_METHOD: "mae", io.TAG_DATASET: "moving_digits"},
        run_name="bench-12x5000",
        json_artifacts={io.FLOP_MODEL_ARTIFACT: model},
        artifact_root=(io.sqlite_path(uri).parent / "artifacts").as_uri(),
    )
    # The trainer also logs every per-block key as a metric; keep the latest value of each, as
    # MLflow's run snapshot would show it (the full history would only slow the setup).
    last = layer_df.sort_values("step").groupby(["metric", "block"]).tail(1)
    io.client(uri).log_batch(
        run_id,
        metrics=[
            Metric(io.block_key(m, int(b)), float(v), 1_700_000_000_000 + int(s), int(s))
            for m, b, v, s in zip(last["metric"], last["block"], last["value"], last["step"], strict=True)
        ],
    )
    return run_id, len(layer_df)


def make_live_run(uri: str, blocks: int, steps: int) -> str:
    """A RUNNING run of the same size with no artifact yet: the page reads metric histories.

    Only ``cka_final`` (what the page shows and the default rule reads) gets a full history;
    the other per-block keys get their latest value, enough for the metric list.
    """
    import pandas as pd

    from analysis import io
    from analysis.testing import create_run_from_frames, synthetic_history, synthetic_layer_metrics

    conv = [int(steps * (0.15 + 0.6 * b / blocks)) for b in range(blocks - 2)] + [None, None]
    layer_df = synthetic_layer_metrics(conv, total_steps=steps, probe_every=1, log_every=1)
    full = layer_df[layer_df["metric"] == "cka_final"]
    last = layer_df[layer_df["metric"] != "cka_final"].sort_values("step").groupby(["metric", "block"]).tail(1)
    return create_run_from_frames(
        "bench",
        uri=uri,
        layer_df=pd.concat([full, last]),
        layer_artifact=False,
        history=synthetic_history(steps, 1),
        status="RUNNING",
        run_name="bench-live",
        params={"model.depth": blocks, "train.steps": steps, "probe.every": 1},
        tags={io.TAG_METHOD: "mae", io.TAG_DATASET: "moving_digits"},
        artifact_root=(io.sqlite_path(uri).parent / "artifacts").as_uri(),
    )


def render(at=None):
    """Render the Convergence page; returns (AppTest, seconds of the page's run, seconds in all).

    A new session first renders the default page (Runs), as a browser would; only the
    Convergence run counts as the page's time.
    """
    from streamlit.testing.v1 import AppTest

    start = time.perf_counter()
    if at is None:
        at = AppTest.from_file(HOME, default_timeout=300)
        at.run()
        at.switch_page("screens/convergence.py")
    t0 = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - t0
    if at.exception or at.error or len(at.get("plotly_chart")) < 2:
        raise RuntimeError(f"convergence page did not render: {[e.value for e in at.exception or at.error]}")
    return at, elapsed, time.perf_counter() - start


def breakdown(uri: str, run_id: str) -> dict[str, float]:
    """The cold path step by step, outside Streamlit."""
    from analysis import io
    from analysis.convergence import detect_convergence, metric_wide
    from app.views import charts

    out = {}
    t0 = time.perf_counter()
    frame = io.load_layer_metrics(run_id, uri, metrics=("cka_final",))
    out["read_store_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    wide = metric_wide(frame, "cka_final")
    out["step_x_block_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    conv = detect_convergence(frame, "posthoc")
    out["detect_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    figs = [charts.layer_heatmap(wide, "cka_final", conv), charts.block_curves(wide, "cka_final", conv, 0.95)]
    for fig in figs:
        fig.to_json()
    out["figures_s"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument(
        "--repeats",
        type=int,
        default=6,
        help="cold and warm renders each (median and, from 6 on, its 95%% interval reported)",
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument(
        "--live",
        action="store_true",
        help="also time a RUNNING run of the same size (no artifact: metric histories are read)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        os.environ["LAYERLOCK_RUNS_DIR"] = str(Path(tmp) / "runs")
        t0 = time.perf_counter()
        run_id, n_values = make_run(uri, args.blocks, args.steps)
        setup_s = time.perf_counter() - t0

        import streamlit as st

        first = render()[2]
        import logging

        # Clearing st.cache_data outside a server logs "No runtime found" each time: expected here.
        logging.getLogger("streamlit.runtime.caching.cache_data_api").setLevel(logging.ERROR)
        cold, warm_same, warm_new = [], [], []
        for _ in range(args.repeats):
            st.cache_data.clear()
            at, seconds, _ = render()
            cold.append(seconds)
            warm_same.append(render(at)[1])
            warm_new.append(render()[1])
        parts = breakdown(uri, run_id)
        live = None
        if args.live:
            make_live_run(uri, args.blocks, args.steps)  # newest run: the page's default
            live = []
            for _ in range(args.repeats):
                st.cache_data.clear()
                live.append(render()[1])

    from analysis.stats import median_interval

    intervals = {
        name: median_interval(values)[1:]
        for name, values in (("cold_s", cold), ("warm_same_session_s", warm_same), ("warm_new_session_s", warm_new))
    }
    result = {
        "blocks": args.blocks,
        "steps": args.steps,
        "values": n_values,
        "setup_s": setup_s,
        "first_render_s": first,
        "cold_s": statistics.median(cold),
        "cold_all_s": cold,
        "warm_same_session_s": statistics.median(warm_same),
        "warm_new_session_s": statistics.median(warm_new),
        "intervals_95": intervals,
        "cold_breakdown": parts,
        "targets": {"cold_s": COLD_TARGET_S, "warm_s": WARM_TARGET_S},
    }
    if live:
        result["live_cold_s"] = statistics.median(live)
    warm = max(result["warm_same_session_s"], result["warm_new_session_s"])
    result["meets_targets"] = result["cold_s"] < COLD_TARGET_S and warm < WARM_TARGET_S
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"Convergence page, synthetic run: {args.blocks} blocks x {args.steps} steps x 7 metrics "
        f"({n_values:,} values; setup {setup_s:.1f} s)"
    )
    print(f"  first visit in this process (Runs then Convergence, app imports included): {first:.2f} s")

    def ci(name: str) -> str:
        lo, hi = intervals[name]
        return "(too few repeats for an interval)" if lo is None else f"95% interval [{lo:.2f}, {hi:.2f}]"

    print(f"  medians of {args.repeats} renders each")
    print(
        f"  cold (caches cleared, new session): {result['cold_s']:6.2f} s {ci('cold_s')}   "
        f"target < {COLD_TARGET_S} s   all: {', '.join(f'{c:.2f}' for c in cold)}"
    )
    print(
        f"  warm, same session:                 {result['warm_same_session_s']:6.2f} s "
        f"{ci('warm_same_session_s')}   target < {WARM_TARGET_S} s"
    )
    print(f"  warm, new session:                  {result['warm_new_session_s']:6.2f} s {ci('warm_new_session_s')}")
    print("  cold path outside Streamlit: " + ", ".join(f"{k.removesuffix('_s')} {v:.3f} s" for k, v in parts.items()))
    if live:
        print(f"  running run (histories, no artifact), cold:      {result['live_cold_s']:6.2f} s")
    print("meets targets" if result["meets_targets"] else "MISSES a target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
