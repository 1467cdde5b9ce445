"""``demo``: the main job on a fresh machine.

On the embedded sqlite store, for each seed (``--seeds``, default one) it: (1) trains mae_tiny,
(2) derives a freezing schedule from that run's per-block convergence, (3) trains LayerLock with
the schedule, (4) the ``latent_scheduled`` ablation (LayerLock's target schedule, nothing
frozen), (5) the naive-latent collapse baseline, (6) MAE with the same schedule but pixel loss
only ("freeze only", which isolates the compute that freezing saves); then it evaluates every
encoder and a randomly initialised one with attentive and linear probes, and prints one table
(mean ± sd (N) with several seeds) and the probe differences against MAE with their intervals.
On a terminal it shows progress bars; written to a file or a CI log it prints stage lines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from core.schema import EVAL, TAG_GROUP, TAG_SCHEDULE_SOURCE
from experiments import CONFIGS


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def derive_demo_schedule(
    mae_run: str, uri: str | None, threshold: float, margin: int, max_frac: float, out_dir: Path
) -> tuple[Path, dict]:
    """Schedule from the MAE run's post-hoc convergence (analysis), written to a JSON file."""
    from analysis import io
    from analysis.convergence import convergence_report, posthoc_convergence
    from analysis.schedule import schedule_for_run

    layer = io.load_layer_metrics(mae_run, uri)
    record = io.get_run(mae_run, uri)
    depth = int(record.params["model.depth"])
    report = convergence_report(layer, method="posthoc", threshold=threshold, run_id=mae_run)
    cap = max(1, min(depth - 1, math.floor(max_frac * depth)))
    sched = schedule_for_run(
        mae_run,
        posthoc_convergence(layer, threshold=threshold),
        method="posthoc",
        threshold=threshold,
        total_steps=record.param_int("train.steps"),
        n_blocks=depth,
        flop_model=io.load_flop_model(mae_run, uri),
        margin=margin,
        max_frozen=cap,
        time_model=io.load_time_model(mae_run, uri),
    )
    if not sched["stages"]:
        _say(f"no block converged at threshold {threshold}: nothing to freeze; LayerLock will run unfrozen")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"schedule_{mae_run}.json"
    path.write_text(json.dumps(sched, indent=2))
    io.log_schedule_artifact(mae_run, sched, uri)
    conv_txt = ", ".join(f"b{b['block']}:{b['converged_step']}" for b in report["blocks"])
    _say(f"convergence (cka_final >= {threshold}): {conv_txt}; spearman rho {report['spearman_rho']}")
    _say(
        "derived schedule: "
        + ", ".join(f"step {s['step']} -> {s['frozen']} frozen" for s in sched["stages"])
        + f"; predicted saving (freezing, pixel loss): FLOPs {sched['predicted_flop_saving']:.1%}, "
        + f"wall time {_pct(sched['predicted_time_saving'])} ({sched['prediction']['time_model']})"
    )
    return path, sched


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


# Demo runs in training order: name -> (config file, trained with the derived schedule?).
DEMO_RUNS: dict[str, tuple[str, bool]] = {
    "mae": ("mae_tiny.yaml", False),
    "layerlock": ("layerlock_tiny.yaml", True),
    "latent_scheduled": ("latent_scheduled_tiny.yaml", True),
    "latent_naive": ("latent_naive_tiny.yaml", False),
    "freeze_only": ("mae_tiny.yaml", True),
}


def run_demo(
    steps: int,
    uri: str | None,
    probe_every: int,
    threshold: float,
    margin: int,
    max_frac: float,
    tasks: list[str] | None,
    out_dir: Path,
    freeze_only: bool = True,
    overrides: list[str] | None = None,
    eval_train_clips: int | None = None,
    eval_val_clips: int | None = None,
    seeds: list[int] | None = None,
    progress: bool = True,
    executor: dict | None = None,
) -> dict:
    """Train every demo run for each seed (the schedule of a seed comes from that seed's MAE run)
    through :func:`experiments.executor.run_specs` (``executor``: its ``executor``/``workers``/
    ``ray_address``), evaluate them and a random-init encoder per seed; returns runs, schedules,
    evals and the table."""
    from analysis import io
    from analysis.compare import COMPARE_PARTS, compare_runs
    from core.config import load_config
    from core.readout import load_eval_data
    from experiments.evaluate import evaluate_run, random_init_baseline
    from experiments.executor import run_specs, spec_for
    from experiments.seeds import seed_config

    seeds = seeds or [0]
    demo_id = time.strftime("demo-%Y%m%d-%H%M%S")
    common = [
        f"train.steps={steps}",
        f"probe.every={probe_every}",
        "tracking.experiment=layerlock-demo",
        f"train.checkpoint_every={max(1, steps // 3)}",
        *(overrides or []),
    ]
    names = [n for n in DEMO_RUNS if freeze_only or n != "freeze_only"]
    runs: dict[str, dict[int, str]] = {n: {} for n in names}
    schedules: dict[int, dict] = {}
    t0 = time.perf_counter()

    def stage(label: str) -> None:
        _say(f"[demo {time.perf_counter() - t0:6.0f} s] {label}")

    def spec(name: str, seed: int):
        config, scheduled = DEMO_RUNS[name]
        extra = [*common, f"tracking.run_name={name}", f"train.seed={seed}"]
        tags = {TAG_GROUP: f"{demo_id}-{name}"}
        if scheduled:
            extra.append(f"freeze.schedule={schedules[seed]['path']}")
            tags[TAG_SCHEDULE_SOURCE] = runs["mae"][seed]
        return spec_for(
            load_config(CONFIGS / config, extra),
            f"{name} seed {seed}",
            tags,
            identity={**tags, "train.seed": str(seed)},
        )

    def train_all(pairs: list[tuple[str, int]]) -> None:
        results = run_specs(
            [spec(n, s) for n, s in pairs], uri=uri, desc="demo runs", progress=progress, **(executor or {})
        )
        for (name, seed), result in zip(pairs, results, strict=True):
            runs[name][seed] = result.run_id

    # Two stages: the runs without a schedule (MAE, naive latent), then, with each seed's schedule
    # derived from its MAE run, the scheduled ones.
    first = [n for n in names if not DEMO_RUNS[n][1]]
    stage("train " + ", ".join(first))
    train_all([(n, s) for s in seeds for n in first])
    for seed in seeds:
        stage(f"schedule (seed {seed})")
        path, sched = derive_demo_schedule(runs["mae"][seed], uri, threshold, margin, max_frac, out_dir)
        schedules[seed] = {"path": path, "schedule": sched}
    second = [n for n in names if DEMO_RUNS[n][1]]
    stage("train " + ", ".join(second))
    train_all([(n, s) for s in seeds for n in second])
    stage("evaluate")
    base_cfg = load_config(CONFIGS / "mae_tiny.yaml", common)
    # one set of probe clips for every encoder, so all are scored on the same examples
    data = load_eval_data(base_cfg, tasks, train_clips=eval_train_clips, val_clips=eval_val_clips, progress=progress)
    evals = {
        name: {
            seed: evaluate_run(rid, tasks=tasks, tracking_uri=uri, probe="both", data=data, progress=progress)
            for seed, rid in by_seed.items()
        }
        for name, by_seed in runs.items()
    }
    evals["random_init"] = {
        seed: random_init_baseline(seed_config(base_cfg, seed), tasks=tasks, probe="both", data=data, progress=progress)
        for seed in seeds
    }
    table = compare_runs(
        io.load_runs([rid for by_seed in runs.values() for rid in by_seed.values()], uri, COMPARE_PARTS).values()
    )
    return {
        "runs": runs,
        "schedules": schedules,
        "evals": evals,
        "table": table,
        "seeds": seeds,
        "demo_id": demo_id,
        "wall_s": time.perf_counter() - t0,
        "uri": uri,
    }


def freeze_only_predictions(result: dict) -> list[str]:
    """``analysis.compare.prediction_lines`` for the freeze-only runs (MAE with the derived
    schedule): the one run whose cost the MAE run's time and FLOP models describe."""
    from analysis.compare import prediction_lines

    ids = result["runs"].get("freeze_only", {})
    table = result["table"]
    rows = table[table["run_id"].isin(list(ids.values()))]
    lines = prediction_lines(rows, {rid: f"freeze_only/{seed}" for seed, rid in ids.items()})
    for seed, rid in ids.items():
        drift = load_drift(result["runs"]["mae"][seed], rid, result.get("uri"))
        if drift is not None and abs(drift - 1) > 0.05:
            lines.append(
                f"  seed {seed}: the machine's load changed between the two runs (unfrozen steps took "
                f"{drift:.2f}x as long in freeze_only as in mae): the wall saving measured against mae "
                "carries that change, the one measured within the run does not"
            )
    return lines


def load_drift(mae_run: str, other_run: str, uri: str | None) -> float | None:
    """How much longer an unfrozen step took in ``other_run`` than in ``mae_run`` (ratio of their
    k=0 training medians in ``time_model.json``): the same work, so ~1 unless the load changed."""
    from analysis import io

    medians = []
    for rid in (mae_run, other_run):
        entry = ((io.load_time_model(rid, uri) or {}).get("training") or {}).get("0") or {}
        medians.append(entry.get("median_s"))
    return medians[1] / medians[0] if all(medians) else None


def _eval_cols(table) -> list[str]:
    return [c for c in table.columns if c.startswith(EVAL) and "/block_" not in c]


def format_table(result: dict) -> str:
    """One row per run (one seed) or per method as mean ± sd (N) (several seeds), random init last."""
    import pandas as pd

    table = result["table"].copy()
    names = {rid: name for name, by_seed in result["runs"].items() for rid in by_seed.values()}
    table.insert(0, "run", table["run_id"].map(names))
    eval_cols = _eval_cols(table)
    cols = [
        "run",
        "seed",
        "final_loss_pixel",
        "total_flops",
        "wall_s",
        "flop_saving",
        "wall_saving",
        "eff_rank_mean",
        "feat_std_min",
        *eval_cols,
    ]
    view = table[cols].copy()
    view["total_flops"] = view["total_flops"] / 1e12
    rand = pd.DataFrame(
        [
            {"run": "random_init", "seed": s, **{c: m.get(c) for c in eval_cols}}
            for s, m in result["evals"]["random_init"].items()
        ]
    )
    view = pd.concat([view, rand], ignore_index=True)
    view = view.rename(
        columns={
            "final_loss_pixel": "pixel_loss",
            "total_flops": "TFLOP",
            "eff_rank_mean": "eff_rank",
            "feat_std_min": "feat_std",
        }
    )
    view.columns = [c.removeprefix(EVAL) for c in view.columns]
    if len(result["seeds"]) == 1:
        return view.drop(columns="seed").to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")
    from analysis.stats import format_mean_sd

    metrics = [c for c in view.columns if c not in ("run", "seed")]
    rows = []
    for name, part in view.groupby("run", sort=False):
        row = {"run": name}
        for m in metrics:
            vals = pd.to_numeric(part[m], errors="coerce").dropna()
            row[m] = (
                format_mean_sd(
                    float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else math.nan, len(vals), "{:.3g}"
                )
                if len(vals)
                else "-"
            )
        rows.append(row)
    return pd.DataFrame(rows).to_string(index=False)


def paired_lines(result: dict) -> list[str]:
    """Each method's eval metrics minus MAE's, paired on the seed, with a 95% t interval."""
    from analysis.stats import t_interval, verdict

    seeds = result["seeds"]
    evals = result["evals"]
    lines = []
    for name in [n for n in evals if n != "mae"]:
        for key in sorted({k for m in evals["mae"].values() for k in m if "/block_" not in k}):
            diffs = [
                evals[name][s][key] - evals["mae"][s][key]
                for s in seeds
                if key in evals[name].get(s, {}) and key in evals["mae"].get(s, {})
            ]
            if not diffs:
                continue
            mean = sum(diffs) / len(diffs)
            ci = t_interval(diffs)
            interval = "" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
            lines.append(
                f"  {name:>16} - mae  {key.removeprefix('eval/'):<22} {mean:+.3f}{interval}  "
                f"{verdict(mean, ci, len(diffs))}"
            )
    return lines


def check_demo_args(args: argparse.Namespace) -> None:
    """Reject numbers the demo would only trip over after training (LayerLockError)."""
    from analysis.convergence import check_threshold
    from core.errors import LayerLockError

    check_threshold("posthoc", args.threshold)
    if args.margin < 0:
        raise LayerLockError(f"--margin must be a non-negative number of steps, got {args.margin}")
    if not 0 < args.max_frozen_fraction < 1:
        raise LayerLockError(
            f"--max-frozen-fraction must be in (0, 1) (at least one block trains), got {args.max_frozen_fraction}"
        )


# Where `streamlit run app/Home.py` serves (app/.streamlit/config.toml: 127.0.0.1, Streamlit's port).
DASHBOARD_URL = "http://127.0.0.1:8501"


def dashboard_link(page: str, **query: str) -> str:
    """``dashboard_link("compare", demo="demo-...")`` -> the URL of that page opened on that demo."""
    from urllib.parse import urlencode

    return f"{DASHBOARD_URL}/{page}" + (f"?{urlencode(query)}" if query else "")


def cmd_demo(args: argparse.Namespace) -> int:
    from experiments.executor import options
    from experiments.seeds import parse_seeds

    executor = options(args)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    seeds = parse_seeds(args.seeds)
    check_demo_args(args)  # before minutes of training, not after
    progress = sys.stderr.isatty()
    if not progress:  # a file or CI log: stage lines, not thousands of progress-bar frames
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    result = run_demo(
        args.steps,
        args.tracking_uri,
        args.probe_every,
        args.threshold,
        args.margin,
        args.max_frozen_fraction,
        tasks,
        Path(args.out_dir),
        freeze_only=not args.no_freeze_only,
        overrides=args.set,
        eval_train_clips=args.eval_train_clips,
        eval_val_clips=args.eval_val_clips,
        seeds=seeds,
        progress=progress,
        executor=executor,
    )
    n = len(seeds)
    print()
    print(
        f"LayerLock Lab demo: MAE vs LayerLock vs ablations (moving_digits), {n} seed{'s' if n > 1 else ''} "
        f"({', '.join(map(str, seeds))}), {result['wall_s'] / 60:.1f} min"
    )
    print(format_table(result))
    for seed, s in result["schedules"].items():
        sched = s["schedule"]
        print(
            f"\nschedule (seed {seed}) derived from MAE run {result['runs']['mae'][seed]}: "
            + (", ".join(f"step {st['step']} -> {st['frozen']} frozen" for st in sched["stages"]) or "nothing frozen")
            + f" (predicted saving: FLOPs {sched['predicted_flop_saving']:.1%}, "
            + f"wall time {_pct(sched['predicted_time_saving'])} from {sched['predicted_time_basis']})"
        )
    lines = freeze_only_predictions(result)
    if lines:
        print(
            "\nfreeze only: the schedule's saving predicted from the MAE run (its measured step times, or FLOPs),"
            " against the saving measured: wall_s against MAE; within the run (its frozen steps against its own"
            " unfrozen ones); cpu_s and counted FLOPs against MAE:"
        )
        print("\n".join(lines))
    if n == 1:
        print(
            "\none seed: differences between these rows have no interval and are not claims; run --seeds 0,1,2 "
            "(or `python -m experiments study`) to compare with intervals."
        )
    else:
        print("\nprobe differences against MAE (paired on the seed; 95% t interval; inside it: no difference):")
        print("\n".join(paired_lines(result)))
    print("flop_saving / wall_saving are against MAE. At the last probe: eff_rank = mean over blocks,")
    print("feat_std = smallest over blocks of the spread across clips, at each fixed token position, of")
    print("layer-normalised features (near 0: collapsed). acc = attentive probe, linear_acc = linear probe on")
    print("mean-pooled tokens; chance: digit 0.10, direction 0.125.")
    print(
        "next: streamlit run app/Home.py, then open "
        f"{dashboard_link('compare', demo=result['demo_id'])}  (MAE against LayerLock and the ablations; the "
        "Convergence and Schedule pages open on the MAE run)"
    )
    for name, by_seed in result["runs"].items():
        for seed, rid in by_seed.items():
            print(f"{name if n == 1 else f'{name}/{seed}':>16}: {rid}")
    return 0


def register(sub, add_tracking) -> None:
    from experiments.executor import add_options as add_executor_options

    p = sub.add_parser("demo", help="train MAE, derive a schedule, train LayerLock and the naive baseline, compare")
    p.add_argument("--steps", type=int, default=300, help="training steps of every run")
    p.add_argument("--probe-every", type=int, default=20, help="probe interval (finer: sharper convergence steps)")
    p.add_argument("--threshold", type=float, default=0.95, help="post-hoc cka_final convergence threshold")
    p.add_argument("--margin", type=int, default=0, help="steps added after convergence before freezing")
    p.add_argument("--max-frozen-fraction", type=float, default=0.75, help="cap on the frozen prefix")
    p.add_argument("--tasks", default=None, help="comma-separated probe tasks (default: all of the dataset)")
    p.add_argument("--out-dir", default="runs/demo", help="where the derived schedule JSON is written")
    p.add_argument("--no-freeze-only", action="store_true", help="skip the pixel-loss run with the same schedule")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every run (repeatable)")
    p.add_argument("--eval-train-clips", type=int, default=None, help="probe training clips (default 1024)")
    p.add_argument("--eval-val-clips", type=int, default=None, help="probe validation clips (default 512)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each trains every demo run (default 0)")
    add_executor_options(p)
    add_tracking(p)
    p.set_defaults(func=cmd_demo)
