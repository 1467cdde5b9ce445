"""``bench freezing|tracking|profile|data|cli|monitor|own-freezing``: side-by-side measurements in
one process, printed as ratios (monitor, own-freezing: experiments/bench_own_loop.py).

freezing: for k = 0..depth-1 frozen blocks, the step time on the same batch in rounds
interleaved across k, so drift in machine load hits every k alike; each k's ratio to k=0 is the
median over rounds with a 95% interval, against counted FLOPs; wall and CPU time.
tracking: the same short run with probes+tracking off and on, alternated; the on/off ratio of
the training loop's time per step, median over pairs with a 95% interval; wall and CPU time.
Both go on (up to a limit) until their intervals are within ``--within`` (1%), and say when
they are not.
profile: torch.profiler of the trainer's step at one frozen-prefix length (experiments.stepprofile).
data: seconds to build a batch of 32 procedural clips, per dataset (median of repeats).
cli: seconds for ``python -m analysis convergence --json`` on a synthetic run, start-up included.
Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from experiments import config_path


def ratio_stats(num: list[float], den: list[float], within: float) -> dict:
    """Paired ratios ``num[i] / den[i]`` (one per interleaved round or repeat): their median, its
    95% distribution-free interval (``core.timemodel.median_interval``) and whether the interval
    resolves ``within`` (half-width <= within x median)."""
    from core.timemodel import median_interval, resolves

    ratios = [a / b for a, b in zip(num, den, strict=True)]
    med, lo, hi = median_interval(ratios)
    return {"ratio": round(med, 4), "low": None if lo is None else round(lo, 4),
            "high": None if hi is None else round(hi, 4), "resolved": resolves(lo, hi, med, within)}


def per_step_ratio(num_runs: list[list[float]], den_runs: list[list[float]], within: float,
                   n_boot: int = 2000, seed: int = 0) -> dict:
    """Two sets of runs of the same steps (each run: every step's seconds, in step order): the
    ratio of their summed per-step medians over runs, with a 95% bootstrap interval (runs
    resampled with replacement within each set, ``n_boot`` times) and whether it resolves
    ``within``. Step i does the same work in every run of a set, so the per-step median drops
    another process's burst from one run while keeping a cost that comes back at the same step
    in every run (a probe, a log line, a checkpoint); whole-run times swing by +-10% with the
    machine's load and cannot resolve a few percent."""
    import numpy as np

    from core.timemodel import resolves

    a, b = np.asarray(num_runs, dtype=float), np.asarray(den_runs, dtype=float)   # (runs, steps)
    point = float(np.median(a, axis=0).sum() / np.median(b, axis=0).sum())
    if len(a) < 3 or len(b) < 3:
        return {"ratio": round(point, 4), "low": None, "high": None, "resolved": False}
    rng = np.random.default_rng(seed)
    boots = [np.median(a[rng.integers(len(a), size=len(a))], axis=0).sum()
             / np.median(b[rng.integers(len(b), size=len(b))], axis=0).sum() for _ in range(n_boot)]
    lo, hi = (float(v) for v in np.percentile(boots, [2.5, 97.5]))
    return {"ratio": round(point, 4), "low": round(lo, 4), "high": round(hi, 4),
            "resolved": resolves(lo, hi, point, within)}


def _interval_text(r: dict) -> str:
    if r["low"] is None:
        return f"{r['ratio']:.3f} [too few]"
    return f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def bench_freezing(config: str, overrides: list[str] | None, batch_size: int, rounds: int,
                   steps_per_round: int, warmup: int, max_rounds: int | None = None,
                   within: float = 0.01) -> dict:
    """Step time at k = 0..depth-1 frozen blocks against counted FLOPs, in interleaved rounds.

    Each round times ``steps_per_round`` steps at every k (order reversed every other round) and
    keeps their median; a k's time ratio is the median over rounds of (round's k / round's k=0),
    with a 95% interval. Rounds go on past ``rounds`` until every ratio's interval is within
    ``within`` of it or ``max_rounds`` is reached. Wall time and the process's CPU time are both
    timed: on a machine shared with other jobs, CPU time is what a one-thread step costs,
    wall time also what the other jobs took from it.
    """
    import torch

    from core.config import load_config
    from core.data import build_dataset, get_batch
    from core.flops import count_step_flops
    from core.freezing import set_frozen_prefix
    from core.masking import tube_mask
    from core.model import build_model
    from core.objectives import compute_losses
    from core.train import build_optimizer

    cfg = load_config(config_path(config), overrides)
    depth = cfg.model.depth
    max_rounds = max(rounds, max_rounds or rounds)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.geometry)
    optimizer = build_optimizer(model, cfg)
    video, _ = get_batch(build_dataset(cfg.data, "train"), range(batch_size))
    keep, mask = tube_mask(batch_size, cfg.geometry.grid, cfg.model.mask_ratio, torch.Generator().manual_seed(0))

    def step() -> None:
        losses = compute_losses(model, model, video, keep, mask, cfg.objective)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timings = interleaved_timings(depth, lambda k: set_frozen_prefix(model, optimizer, k), step, rounds,
                                  steps_per_round, warmup, max_rounds, within, "bench freezing")
    flops = [count_step_flops(cfg, batch_size, k) for k in range(depth)]
    rows = freezing_rows(timings, flops, within)
    return {"rows": rows, "rounds": timings["rounds"], "steps_per_round": steps_per_round, "batch_size": batch_size,
            "within": within, "resolved": all(row["resolved"] for row in rows)}


def interleaved_timings(levels: int, set_level, step, rounds: int, steps_per_round: int, warmup: int,
                        max_rounds: int | None = None, within: float = 0.01, desc: str = "bench") -> dict:
    """Time ``step()`` at every level k = 0..levels-1 (``set_level(k)`` before each), in rounds.

    Each round times ``steps_per_round`` steps at every k (order reversed every other round, so
    drift in machine load hits every k alike) after ``warmup`` untimed ones, and keeps their
    median, in wall and CPU time. Rounds go on past ``rounds`` until every k's ratio to k=0
    (:func:`ratio_stats`) is resolved to ``within`` or ``max_rounds`` is reached. Returns
    ``{"wall": {k: per-round medians}, "cpu": {...}, "all": {k: every timed step}, "rounds": n}``.
    """
    from tqdm.auto import tqdm

    max_rounds = max(rounds, max_rounds or rounds)
    wall: dict[int, list[float]] = {k: [] for k in range(levels)}
    cpu: dict[int, list[float]] = {k: [] for k in range(levels)}
    everything: dict[int, list[float]] = {k: [] for k in range(levels)}

    def resolved() -> bool:
        return all(ratio_stats(wall[k], wall[0], within)["resolved"] for k in range(1, levels))

    r = 0
    with tqdm(total=max_rounds * levels, desc=desc, unit="k", file=sys.stderr) as bar:
        while r < rounds or (r < max_rounds and not resolved()):
            for k in list(range(levels)) if r % 2 == 0 else list(reversed(range(levels))):
                set_level(k)
                for _ in range(warmup):
                    step()
                w, c = [], []
                for _ in range(steps_per_round):
                    t0, c0 = time.perf_counter(), time.process_time()
                    step()
                    w.append(time.perf_counter() - t0)
                    c.append(time.process_time() - c0)
                wall[k].append(statistics.median(w))
                cpu[k].append(statistics.median(c))
                everything[k] += w
                bar.update(1)
            r += 1
    return {"wall": wall, "cpu": cpu, "all": everything, "rounds": r}


def freezing_rows(timings: dict, flops: list[float], within: float) -> list[dict]:
    """Per k: median step time, its time and CPU ratio to k=0 with 95% intervals (from
    :func:`interleaved_timings`), against the FLOP ratio ``flops[k] / flops[0]``."""
    wall, cpu = timings["wall"], timings["cpu"]
    rows = []
    for k in range(len(flops)):
        t, c = ratio_stats(wall[k], wall[0], within), ratio_stats(cpu[k], cpu[0], within)
        f = flops[k] / flops[0]
        rows.append({"frozen": k, "step_ms": round(statistics.median(timings["all"][k]) * 1000, 3),
                     "flops": flops[k], "time_ratio": t["ratio"], "time_low": t["low"], "time_high": t["high"],
                     "cpu_ratio": c["ratio"], "cpu_low": c["low"], "cpu_high": c["high"],
                     "flop_ratio": round(f, 4), "time_vs_flop": round(t["ratio"] / f, 4),
                     "cpu_vs_flop": round(c["ratio"] / f, 4), "resolved": t["resolved"]})
    return rows


def bench_tracking(config: str, overrides: list[str] | None, repeats: int, steps: int | None = None,
                   max_repeats: int | None = None, within: float = 0.01) -> dict:
    """The same short run with probes and tracking off and on, alternated, ``repeats`` pairs at
    least (more, up to ``max_repeats``, until the on/off ratio's 95% interval is within
    ``within``). The ratio: every loop iteration's wall time (step, probe, log line, checkpoint:
    ``TrainResult.step_s``), its median over the runs of each mode, summed
    (:func:`per_step_ratio`, bootstrap interval). Also per run: the loop's wall and CPU time per
    step (``loop_s``, ``loop_cpu_s``), their on/off ratio over pairs; set-up and the end-of-run
    probe and uploads are outside the loop and reported apart."""
    from core.config import load_config
    from core.train import train

    cfg_on = load_config(config_path(config), [*(overrides or []), *([f"train.steps={steps}"] if steps else [])])
    cfg_off = cfg_on.model_copy(deep=True)
    cfg_off.probe.enabled = False
    n_steps = cfg_on.train.steps
    max_repeats = max(repeats, max_repeats or repeats)
    runs: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": [], "total": []} for m in ("off", "on")}
    per_step: dict[str, list[list[float]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        r = 0
        while r < repeats or (r < max_repeats and not per_step_ratio(per_step["on"], per_step["off"],
                                                                     within)["resolved"]):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                print(f"bench tracking: repeat {r + 1}, tracking {mode}", file=sys.stderr)
                started = time.perf_counter()
                result = (train(cfg_off, track=False, progress=False) if mode == "off"
                          else train(cfg_on, tracking_uri=uri, progress=False))
                runs[mode]["total"].append(time.perf_counter() - started)
                runs[mode]["wall"].append(result.loop_s / n_steps)
                runs[mode]["cpu"].append(result.loop_cpu_s / n_steps)
                per_step[mode].append(result.step_s)
            r += 1
    steps_ratio = per_step_ratio(per_step["on"], per_step["off"], within)
    wall = ratio_stats(runs["on"]["wall"], runs["off"]["wall"], within)
    cpu = ratio_stats(runs["on"]["cpu"], runs["off"]["cpu"], within)
    ms = {m: {k: [round(v * 1000, 3) for v in vals] for k, vals in d.items() if k != "total"} for m, d in runs.items()}
    return {"steps": n_steps, "probe_every": cfg_on.probe.every, "checkpoint_every": cfg_on.train.checkpoint_every,
            "repeats": r, "within": within,
            "off_ms": round(statistics.median(runs["off"]["wall"]) * 1000, 3),
            "on_ms": round(statistics.median(runs["on"]["wall"]) * 1000, 3),
            "ratio": steps_ratio["ratio"], "low": steps_ratio["low"], "high": steps_ratio["high"],
            "resolved": steps_ratio["resolved"],
            "step_off_ms": round(sum(statistics.median(c) for c in zip(*per_step["off"])) * 1000 / n_steps, 3),
            "step_on_ms": round(sum(statistics.median(c) for c in zip(*per_step["on"])) * 1000 / n_steps, 3),
            "run_ratio": wall["ratio"], "run_low": wall["low"], "run_high": wall["high"],
            "cpu_ratio": cpu["ratio"], "cpu_low": cpu["low"], "cpu_high": cpu["high"], "cpu_resolved": cpu["resolved"],
            "outside_loop_s": {m: round(statistics.median(runs[m]["total"]) - statistics.median(runs[m]["wall"])
                                        * n_steps, 2) for m in ("off", "on")},
            "off_all_ms": ms["off"]["wall"], "on_all_ms": ms["on"]["wall"],
            "off_all_cpu_ms": ms["off"]["cpu"], "on_all_cpu_ms": ms["on"]["cpu"]}


def _say_resolved(resolved: bool, within: float, what: str, more: str) -> str:
    if resolved:
        return f"every interval is within {within:.1%} of its {what}"
    return (f"CANNOT resolve {within:.1%}: some interval is wider than {within:.1%} of its {what} "
            f"(machine load varies); more repeats may narrow it ({more})")


def cmd_bench(args: argparse.Namespace) -> int:
    from core.errors import LayerLockError

    for flag, least in (("batch_size", 1), ("rounds", 1), ("steps_per_round", 1), ("warmup", 0), ("repeats", 1),
                        ("max_rounds", 1), ("max_repeats", 1), ("steps", 1), ("frozen", 0)):
        value = getattr(args, flag)
        if value is not None and value < least:
            raise LayerLockError(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    if not 0 < args.within < 1:
        raise LayerLockError(f"--within must be a fraction in (0, 1), got {args.within}")
    if args.threads is not None and args.threads < 1:
        raise LayerLockError(f"--threads must be at least 1, got {args.threads}")
    if args.what in OWN_LOOP_BENCHES:
        return cmd_own_loop_bench(args)
    if args.what in ("data", "cli"):
        result = bench_data(args.repeats) if args.what == "data" else bench_cli(args.repeats)
        print(json.dumps(result) if args.json else "  ".join(f"{k} {v:.3f} s" for k, v in result.items()))
        return 0
    import torch

    # One intra-op thread by default: on a small shared machine, OpenMP threads that spin-wait for
    # a busy core make step times swing by 10x and hide the compute being measured.
    threads = args.threads if args.threads is not None else 1
    if threads:
        torch.set_num_threads(threads)
    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
    if args.what == "profile":
        from experiments.stepprofile import format_profile, profile_step

        result = profile_step(args.config, args.set, args.batch_size, args.frozen, args.steps_per_round, args.warmup)
        print(json.dumps(result) if args.json else format_profile(result))
        return 0
    if args.what == "freezing":
        result = bench_freezing(args.config, args.set, args.batch_size, args.rounds, args.steps_per_round,
                                args.warmup, args.max_rounds, args.within)
        if args.json:
            print(json.dumps(result))
            return 0
        print(f"batch {result['batch_size']}, {result['rounds']} interleaved rounds of {result['steps_per_round']} "
              f"steps per k; ratios: median over rounds [95% interval]")
        print(f"{'frozen':>6} {'step_ms':>8} {'GFLOP':>7} {'flops/k0':>8}  {'time/k0 [interval]':<24} "
              f"{'time/flops':>10}  {'cpu/k0 [interval]':<24} {'cpu/flops':>9}")
        for r in result["rows"]:
            t = {"ratio": r["time_ratio"], "low": r["time_low"], "high": r["time_high"]}
            c = {"ratio": r["cpu_ratio"], "low": r["cpu_low"], "high": r["cpu_high"]}
            print(f"{r['frozen']:>6} {r['step_ms']:>8.2f} {r['flops'] / 1e9:>7.3f} {r['flop_ratio']:>8.3f}  "
                  f"{_interval_text(t):<24} {r['time_vs_flop']:>10.3f}  "
                  f"{_interval_text(c):<24} {r['cpu_vs_flop']:>9.3f}")
        print(_say_resolved(result["resolved"], result["within"], "wall-time ratio", "--max-rounds"))
    else:
        result = bench_tracking(args.config, args.set, args.repeats, args.steps or 100, args.max_repeats, args.within)
        if args.json:
            print(json.dumps(result))
            return 0
        print(f"{result['steps']} steps, probe.every {result['probe_every']}, checkpoint_every "
              f"{result['checkpoint_every']}, {result['repeats']} alternated pairs of runs")
        print(f"loop iteration (step, probe, log line, checkpoint), median over runs per step: off "
              f"{result['step_off_ms']:.2f} ms, on {result['step_on_ms']:.2f} ms")
        steps = {"ratio": result["ratio"], "low": result["low"], "high": result["high"]}
        print(f"on / off, summed per-step medians [95% bootstrap interval over runs]: {_interval_text(steps)}")
        print(_say_resolved(result["resolved"], result["within"], "ratio", "--max-repeats"))
        wall = {"ratio": result["run_ratio"], "low": result["run_low"], "high": result["run_high"]}
        cpu = {"ratio": result["cpu_ratio"], "low": result["cpu_low"], "high": result["cpu_high"]}
        print(f"whole loops (off {result['off_ms']:.2f}, on {result['on_ms']:.2f} ms/step), on / off median over "
              f"pairs [95% interval]: wall {_interval_text(wall)}, CPU {_interval_text(cpu)} (swings with load)")
        print(f"outside the loop (set-up; end-of-run probe, uploads): off {result['outside_loop_s']['off']:.2f} s, "
              f"on {result['outside_loop_s']['on']:.2f} s per run")
        print(f"each run (ms/step): off {result['off_all_ms']}  on {result['on_all_ms']}")
    return 0


def bench_data(repeats: int, batch: int = 32) -> dict[str, float]:
    """Median seconds to build ``batch`` procedural clips, per dataset (after one warm-up batch)."""
    from core.config import DataConfig
    from core.data import build_dataset, get_batch

    out = {}
    for name in ("moving_digits", "photo_pans"):
        ds = build_dataset(DataConfig(name=name, frames=8, size=32, train_clips=64, val_clips=16))
        get_batch(ds, range(4))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            get_batch(ds, range(batch))
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def bench_cli(repeats: int) -> dict[str, float]:
    """Median seconds of ``python -m analysis convergence --json`` on a synthetic 7-block run."""
    import subprocess
    from pathlib import Path

    from analysis.testing import create_run_from_frames, synthetic_layer_metrics

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        run_id = create_run_from_frames("bench", uri=uri, artifact_root=(Path(tmp) / "artifacts").as_uri(),
                                        layer_df=synthetic_layer_metrics([120, 180, 260, None], total_steps=600))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "analysis", "convergence", "--run", run_id, "--json",
                            "--tracking-uri", uri], cwd=root, check=True, capture_output=True, timeout=120)
            times.append(time.perf_counter() - start)
    return {"convergence_json_s": statistics.median(times)}


def register(sub, add_tracking) -> None:
    p = sub.add_parser("bench", help="side-by-side measurements: step time vs FLOPs, tracking on vs off")
    p.add_argument("what", choices=["freezing", "tracking", "profile", "data", "cli", *OWN_LOOP_BENCHES])
    p.add_argument("--config", default="experiments/configs/mae_tiny.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--batch-size", type=int, default=64, help="freezing: clips per step")
    p.add_argument("--rounds", type=int, default=8, help="freezing: interleaved rounds over all k (at least)")
    p.add_argument("--max-rounds", type=int, default=24,
                   help="freezing: go on up to this many rounds until every ratio is resolved to --within")
    p.add_argument("--steps-per-round", type=int, default=5,
                   help="freezing: timed steps per k per round; profile: profiled steps")
    p.add_argument("--warmup", type=int, default=2, help="freezing, profile: untimed steps after each freeze change")
    p.add_argument("--frozen", type=int, default=None, help="profile: frozen blocks (default: depth-1)")
    p.add_argument("--repeats", type=int, default=6,
                   help="tracking: pairs of runs (off, on), alternated, at least; data, cli: repeats")
    p.add_argument("--max-repeats", type=int, default=12,
                   help="tracking: go on up to this many pairs until the ratio is resolved to --within")
    p.add_argument("--within", type=float, default=0.01,
                   help="freezing, tracking: the resolution wanted, as a fraction (0.01: intervals within 1%%)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: 1 for freezing, tracking, profile and the own-loop "
                        "benches; torch's own otherwise)")
    add_own_loop_args(p)
    p.set_defaults(func=cmd_bench)


# ----------------------------------------------------------------------------- own loop (bench_own_loop.py)

OWN_LOOP_BENCHES = ("monitor", "own-freezing")


def add_own_loop_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["vit", "video"], default="vit",
                   help="monitor, own-freezing: the README example's torchvision model")
    p.add_argument("--every", type=int, default=50, help="monitor, own-freezing: probe interval in steps")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per run: tracking 100 (the config's probe and checkpoint intervals are kept); "
                        "monitor, own-freezing 300 for vit, 200 for video")


def cmd_own_loop_bench(args: argparse.Namespace) -> int:
    import torch

    from core.errors import LayerLockError
    from experiments import bench_own_loop

    for flag in ("every", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise LayerLockError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads or 1)   # one thread unless asked: see cmd_bench
    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
    if args.what == "monitor":
        steps = args.steps or bench_own_loop.DEFAULT_STEPS[args.model]
        result = bench_own_loop.bench_monitor(args.model, steps, args.every, args.repeats)
        show = bench_own_loop.print_monitor
    else:
        result = bench_own_loop.bench_own_freezing(args.model, args.rounds, args.steps_per_round, args.warmup,
                                                   args.repeats, min(args.every, 20), args.steps,
                                                   args.max_rounds, args.within)
        show = bench_own_loop.print_own_freezing
    if args.json:
        print(json.dumps(result))
    else:
        show(result)
    return 0
