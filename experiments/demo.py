"""``demo``: the main job on a fresh machine.

On the embedded sqlite store it: (1) trains mae_tiny, (2) derives a freezing schedule from that
run's per-block convergence, (3) trains LayerLock with the schedule, (4) trains the naive-latent
collapse baseline, (5) trains MAE with the same schedule but pixel loss only ("freeze only",
which isolates the compute that freezing saves), (6) evaluates every encoder and a randomly
initialised one with attentive probes, and prints one comparison table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

CONFIGS = Path(__file__).resolve().parent / "configs"


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def derive_demo_schedule(mae_run: str, uri: str | None, threshold: float, margin: int, max_frac: float,
                         out_dir: Path) -> tuple[Path, dict]:
    """Schedule from the MAE run's post-hoc convergence (analysis), written to a JSON file."""
    from analysis import io
    from analysis.convergence import convergence_report, posthoc_convergence
    from analysis.schedule import derive_schedule, schedule_with_prediction

    layer = io.load_layer_metrics(mae_run, uri)
    record = io.get_run(mae_run, uri)
    depth, total = int(record.params["model.depth"]), int(record.params["train.steps"])
    report = convergence_report(layer, method="posthoc", threshold=threshold, run_id=mae_run)
    conv = posthoc_convergence(layer, threshold=threshold)
    cap = max(1, min(depth - 1, math.floor(max_frac * depth)))
    sched = derive_schedule(conv, depth, total, margin=margin, max_frozen=cap,
                            source={"run_id": mae_run, "method": "posthoc", "threshold": threshold, "margin": margin})
    if not sched["stages"]:
        _say(f"no block converged at threshold {threshold}: nothing to freeze; LayerLock will run unfrozen")
    sched = schedule_with_prediction(sched, io.load_flop_model(mae_run, uri), total)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"schedule_{mae_run}.json"
    path.write_text(json.dumps(sched, indent=2))
    io.log_schedule_artifact(mae_run, sched, uri)
    conv_txt = ", ".join(f"b{b['block']}:{b['converged_step']}" for b in report["blocks"])
    _say(f"convergence (cka_final >= {threshold}): {conv_txt}; spearman rho {report['spearman_rho']}")
    _say("derived schedule: " + ", ".join(f"step {s['step']} -> {s['frozen']} frozen" for s in sched["stages"])
         + f"; predicted FLOP saving (freezing, pixel loss) {sched['predicted_flop_saving']:.1%}")
    return path, sched


def run_demo(steps: int, uri: str | None, probe_every: int, threshold: float, margin: int, max_frac: float,
             tasks: list[str] | None, out_dir: Path, freeze_only: bool = True, overrides: list[str] | None = None,
             eval_train_clips: int | None = None, eval_val_clips: int | None = None) -> dict:
    from analysis.compare import compare_runs
    from core.config import load_config
    from core.readout import load_eval_data
    from core.train import train
    from experiments.evaluate import evaluate_run, random_init_baseline

    common = [f"train.steps={steps}", f"probe.every={probe_every}", "tracking.experiment=layerlock-demo",
              f"train.checkpoint_every={max(1, steps // 3)}", *(overrides or [])]
    stages = ["MAE", "schedule", "LayerLock", "naive latent"] + (["freeze only"] if freeze_only else []) + ["evaluate"]
    runs: dict[str, str] = {}
    with tqdm(total=len(stages), desc="demo", unit="stage", file=sys.stderr, position=0) as bar:
        def stage(name: str) -> None:
            bar.set_postfix_str(name)

        def run(name: str, label: str, config: str, extra: tuple[str, ...] = (), tags: dict | None = None) -> str:
            """Train one demo run (one stage) and record its id under ``name``."""
            stage(label)
            cfg = load_config(CONFIGS / config, [*common, *extra, f"tracking.run_name={name}"])
            runs[name] = train(cfg, tracking_uri=uri, tags=tags).run_id
            bar.update(1)
            return runs[name]

        mae_id = run("mae", "MAE", "mae_tiny.yaml")

        stage("schedule")
        sched_path, sched = derive_demo_schedule(mae_id, uri, threshold, margin, max_frac, out_dir)
        bar.update(1)
        scheduled = (f"freeze.schedule={sched_path}",)
        source = {"layerlock.schedule_source": mae_id}

        run("layerlock", "LayerLock", "layerlock_tiny.yaml", scheduled, source)
        run("latent_naive", "naive latent", "latent_naive_tiny.yaml")
        if freeze_only:
            run("freeze_only", "freeze only", "mae_tiny.yaml", scheduled, source)

        stage("evaluate")
        base_cfg = load_config(CONFIGS / "mae_tiny.yaml", common)
        # one set of probe clips for every encoder, so all are scored on the same examples
        data = load_eval_data(base_cfg, tasks, train_clips=eval_train_clips, val_clips=eval_val_clips)
        evals = {name: evaluate_run(rid, tasks=tasks, tracking_uri=uri, data=data) for name, rid in runs.items()}
        evals["random_init"] = random_init_baseline(base_cfg, tasks=tasks, data=data)
        bar.update(1)

    table = compare_runs(list(runs.values()), uri)
    return {"runs": runs, "schedule": sched, "evals": evals, "table": table}


def format_table(result: dict) -> str:
    table = result["table"].copy()
    names = {rid: name for name, rid in result["runs"].items()}
    table.insert(0, "run", table["run_id"].map(names))
    eval_cols = [c for c in table.columns if c.startswith("eval/") and "/block_" not in c]
    cols = ["run", "final_loss_pixel", "total_flops", "wall_s", "flop_saving", "wall_saving",
            "eff_rank_mean", "feat_std_min", *eval_cols]
    view = table[cols].copy()
    view["total_flops"] = view["total_flops"] / 1e12
    view = view.rename(columns={"final_loss_pixel": "pixel_loss", "total_flops": "TFLOP",
                                "eff_rank_mean": "eff_rank", "feat_std_min": "feat_std"})
    rnd = result["evals"]["random_init"]
    rand_row = {"run": "random_init", **{c: rnd.get(c) for c in eval_cols}}
    import pandas as pd

    view = pd.concat([view, pd.DataFrame([rand_row])], ignore_index=True)
    view.columns = [c.removeprefix("eval/") for c in view.columns]
    return view.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def cmd_demo(args: argparse.Namespace) -> int:
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    result = run_demo(args.steps, args.tracking_uri, args.probe_every, args.threshold, args.margin,
                      args.max_frozen_fraction, tasks, Path(args.out_dir), freeze_only=not args.no_freeze_only,
                      overrides=args.set, eval_train_clips=args.eval_train_clips, eval_val_clips=args.eval_val_clips)
    print()
    print("LayerLock Lab demo: MAE vs LayerLock vs naive latent (moving_digits)")
    print(format_table(result))
    s = result["schedule"]
    print(f"\nschedule derived from MAE run {result['runs']['mae']}: "
          + (", ".join(f"step {st['step']} -> {st['frozen']} frozen" for st in s["stages"]) or "nothing frozen")
          + f" (predicted FLOP saving {s['predicted_flop_saving']:.1%})")
    print("flop_saving / wall_saving are against the MAE run; at the last probe: eff_rank = mean over blocks,")
    print("feat_std = smallest over blocks of the spread of layer-normalised features (near 0: collapsed).")
    print("chance: digit 0.10, direction 0.125.")
    print("next: streamlit run app/Home.py   (then open the Convergence, Schedule and Compare pages)")
    for name, rid in result["runs"].items():
        print(f"{name:>13}: {rid}")
    return 0


def register(sub, add_tracking) -> None:
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
    p.add_argument("--eval-val-clips", type=int, default=None, help="probe validation clips (default 256)")
    add_tracking(p)
    p.set_defaults(func=cmd_demo)
