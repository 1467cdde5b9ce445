"""Dashboard render time for a large run and a group of seeds: ``python -m app.bench [--json]``.

Creates, in a temporary store, a group of ``--seeds`` (3) synthetic finished runs (one
``layerlock.group``, seeds 0, 1, 2) of ``--blocks`` (12) blocks with every per-block metric
logged at ``--steps`` (5,000) steps (per run 7 metrics x 12 blocks x 5,001 steps, about 420k
values, stored the way the trainer stores a finished run: the ``layer_metrics.parquet`` artifact
plus each key's latest value), then renders the Convergence page with Streamlit's AppTest
(``app/Home.py`` -> ``screens/convergence.py``) on the newest run alone (the single-run page) and
on the group (the mean over its seeds, ``convergence_group`` in the session), and reports, for
each side by side:

- ``first``: the very first visit in this process -- the Runs page, then Convergence -- with the
  imports of the app, plotly and scipy on the way (mlflow is already imported by the setup);
- ``cold``: every ``st.cache_data`` cache cleared, a new session, the page rendered (data read
  from the store, convergence detected, figures built and serialised);
- ``warm``: the same page rendered again, in the same session and in a new session;
- a breakdown of the cold path (store read, step x block table, detection, figures).

It lives in ``app`` because it measures the dashboard (``experiments`` never imports ``app``).

Targets (issue 7 for one run, issue 26 for the group): cold < 2 s, warm < 0.5 s. Render time is
server side (script run plus serialising the page); the browser's drawing is not included.
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


GROUP = "pixel-moving_digits-bench0000"


def make_run(
    uri: str, blocks: int, steps: int, seed: int = 0, group: str | None = None, start_time: int | None = None
) -> tuple[str, int]:
    """A finished synthetic run of the given size (its blocks converge a little later with each
    seed); returns its id and how many per-block values it holds."""
    from mlflow.entities import Metric

    from analysis import io
    from analysis.testing import (
        create_run_from_frames,
        synthetic_flop_model,
        synthetic_history,
        synthetic_layer_metrics,
    )

    conv = [int(steps * (0.15 + 0.6 * b / blocks + 0.02 * seed)) for b in range(blocks - 2)] + [None, None]
    layer_df = synthetic_layer_metrics(conv, total_steps=steps, probe_every=1, log_every=1, seed=seed)
    model = synthetic_flop_model(blocks)
    history = synthetic_history(steps, 1, model, seed=seed)
    run_id = create_run_from_frames(
        "bench",
        uri=uri,
        layer_df=layer_df,
        layer_history=False,
        history=history,
        params={"model.depth": blocks, "train.steps": steps, "probe.every": 1, "train.seed": seed},
        tags={io.TAG_METHOD: "mae", io.TAG_DATASET: "moving_digits", **({io.TAG_GROUP: group} if group else {})},
        run_name=f"bench-{blocks}x{steps}-seed{seed}",
        start_time=start_time,
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


def render(at=None, group: str | None = None):
    """Render the Convergence page (on ``group``'s mean when given); returns (AppTest, seconds of
    the page's run, seconds in all).

    A new session first renders the default page (Runs), as a browser would; only the
    Convergence run counts as the page's time.
    """
    from streamlit.testing.v1 import AppTest

    start = time.perf_counter()
    if at is None:
        at = AppTest.from_file(HOME, default_timeout=300)
        if group:
            at.session_state["convergence_group"] = group  # as if picked on the page
        at.run()
        at.switch_page("screens/convergence.py")
    t0 = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - t0
    if at.exception or at.error or len(at.get("plotly_chart")) < 2:
        raise RuntimeError(f"convergence page did not render: {[e.value for e in at.exception or at.error]}")
    if group and at.selectbox(key="conv_group").value != group:
        raise RuntimeError(f"convergence page did not open on group {group}")
    return at, elapsed, time.perf_counter() - start


def timed(repeats: int, group: str | None = None) -> tuple[list[float], list[float], list[float]]:
    """``repeats`` cold renders (caches cleared, new session), each followed by a warm render in
    the same session and one in a new session."""
    import streamlit as st

    cold, warm_same, warm_new = [], [], []
    for _ in range(repeats):
        st.cache_data.clear()
        at, seconds, _ = render(group=group)
        cold.append(seconds)
        warm_same.append(render(at, group)[1])
        warm_new.append(render(group=group)[1])
    return cold, warm_same, warm_new


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


def group_breakdown(uri: str, run_ids: list[str]) -> dict[str, float]:
    """The group page's cold path step by step, outside Streamlit."""
    from analysis import io
    from analysis.convergence import detect_convergence, group_order, group_steps, mean_over_runs, metric_wide
    from app.views import charts

    out = {}
    t0 = time.perf_counter()
    frames = {r: io.load_layer_metrics(r, uri, metrics=("cka_final",)) for r in run_ids}
    out["read_store_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    wide = mean_over_runs({r: metric_wide(f, "cka_final") for r, f in frames.items()})
    out["mean_over_runs_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    convs = {r: detect_convergence(f, "posthoc") for r, f in frames.items()}
    steps, _ = group_steps(convs), group_order(convs)
    out["detect_and_intervals_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    figs = [
        charts.group_heatmap(wide, "cka_final", steps),
        charts.group_block_curves(wide, "cka_final", steps, 0.95),
        charts.group_convergence_order(steps, {r: r[:8] for r in run_ids}),
    ]
    for fig in figs:
        fig.to_json()
    out["figures_s"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seeds", type=int, default=3, help="runs in the group of seeds (each of the same size)")
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
    if args.seeds < 2:
        parser.error(f"--seeds must be at least 2 (a group of seeds), got {args.seeds}")

    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        os.environ["LAYERLOCK_RUNS_DIR"] = str(Path(tmp) / "runs")
        t0 = time.perf_counter()
        made = [
            make_run(uri, args.blocks, args.steps, seed, GROUP, 1_700_000_000_000 + seed) for seed in range(args.seeds)
        ]
        run_ids, n_values = [r for r, _ in made], made[0][1]
        run_id = run_ids[-1]  # the newest: the single-run page's default
        setup_s = time.perf_counter() - t0

        import streamlit as st

        first = render()[2]
        import logging

        # Clearing st.cache_data outside a server logs "No runtime found" each time: expected here.
        logging.getLogger("streamlit.runtime.caching.cache_data_api").setLevel(logging.ERROR)
        cold, warm_same, warm_new = timed(args.repeats)
        g_cold, g_warm_same, g_warm_new = timed(args.repeats, GROUP)
        parts = breakdown(uri, run_id)
        g_parts = group_breakdown(uri, run_ids)
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
    g_intervals = {
        name: median_interval(values)[1:]
        for name, values in (
            ("cold_s", g_cold),
            ("warm_same_session_s", g_warm_same),
            ("warm_new_session_s", g_warm_new),
        )
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
        "group": {
            "runs": args.seeds,
            "cold_s": statistics.median(g_cold),
            "cold_all_s": g_cold,
            "warm_same_session_s": statistics.median(g_warm_same),
            "warm_new_session_s": statistics.median(g_warm_new),
            "intervals_95": g_intervals,
            "cold_breakdown": g_parts,
        },
        "targets": {"cold_s": COLD_TARGET_S, "warm_s": WARM_TARGET_S},
    }
    if live:
        result["live_cold_s"] = statistics.median(live)

    def meets(r: dict) -> bool:
        return r["cold_s"] < COLD_TARGET_S and max(r["warm_same_session_s"], r["warm_new_session_s"]) < WARM_TARGET_S

    result["group"]["meets_targets"] = meets(result["group"])
    result["meets_targets"] = meets(result) and result["group"]["meets_targets"]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"Convergence page, synthetic runs: {args.blocks} blocks x {args.steps} steps x 7 metrics "
        f"({n_values:,} values per run; a group of {args.seeds} such runs; setup {setup_s:.1f} s)"
    )
    print(f"  first visit in this process (Runs then Convergence, app imports included): {first:.2f} s")

    def ci(found: dict, name: str) -> str:
        lo, hi = found[name]
        return "[  n/a,   n/a]" if lo is None else f"[{lo:5.2f}, {hi:5.2f}]"

    group = result["group"]
    print(f"  medians of {args.repeats} renders each, with their 95% intervals")
    print(f"  {'':36} {'one run':>22}   {f'group of {args.seeds} (mean)':>22}   target")
    for name, text, target in (
        ("cold_s", "cold (caches cleared, new session):", f"< {COLD_TARGET_S} s"),
        ("warm_same_session_s", "warm, same session:", f"< {WARM_TARGET_S} s"),
        ("warm_new_session_s", "warm, new session:", f"< {WARM_TARGET_S} s"),
    ):
        print(
            f"  {text:36} {result[name]:6.2f} s {ci(intervals, name)}   "
            f"{group[name]:6.2f} s {ci(g_intervals, name)}   {target}"
        )
    print(
        f"  cold, all renders: one run {', '.join(f'{c:.2f}' for c in cold)}; "
        f"group {', '.join(f'{c:.2f}' for c in g_cold)}"
    )
    print(
        "  cold path outside Streamlit, one run: "
        + ", ".join(f"{k.removesuffix('_s')} {v:.3f} s" for k, v in parts.items())
    )
    print(
        "  cold path outside Streamlit, group:   "
        + ", ".join(f"{k.removesuffix('_s')} {v:.3f} s" for k, v in g_parts.items())
    )
    if live:
        print(f"  running run (histories, no artifact), cold:      {result['live_cold_s']:6.2f} s")
    print("meets targets" if result["meets_targets"] else "MISSES a target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
