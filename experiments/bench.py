"""``bench freezing|tracking|data|cli|monitor|own-freezing``: side-by-side measurements in one
process, printed as ratios (monitor, own-freezing: experiments/bench_own_loop.py).

freezing: for k = 0..depth-1 frozen blocks, the median step time on the same batch, rounds
interleaved across k so drift in machine load hits every k alike; against counted FLOPs.
tracking: the same short run with probes+tracking off and on, alternated, median per-step time.
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


def bench_freezing(config: str, overrides: list[str] | None, batch_size: int, rounds: int,
                   steps_per_round: int, warmup: int) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from core.config import load_config
    from core.data import build_dataset, get_batch
    from core.flops import count_step_flops
    from core.freezing import set_frozen_prefix
    from core.masking import tube_mask
    from core.model import build_model
    from core.objectives import compute_losses
    from core.train import build_optimizer

    cfg = load_config(config, overrides)
    depth = cfg.model.depth
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

    times: dict[int, list[float]] = {k: [] for k in range(depth)}
    with tqdm(total=rounds * depth, desc="bench freezing", unit="k", file=sys.stderr) as bar:
        for r in range(rounds):
            order = list(range(depth)) if r % 2 == 0 else list(reversed(range(depth)))
            for k in order:
                set_frozen_prefix(model, optimizer, k)
                for _ in range(warmup):
                    step()
                for _ in range(steps_per_round):
                    t0 = time.perf_counter()
                    step()
                    times[k].append(time.perf_counter() - t0)
                bar.update(1)
    flops = {k: count_step_flops(cfg, batch_size, k) for k in range(depth)}
    base_ms, base_flops = statistics.median(times[0]) * 1000, flops[0]
    rows = []
    for k in range(depth):
        ms = statistics.median(times[k]) * 1000
        rows.append({"frozen": k, "step_ms": round(ms, 3), "flops": flops[k],
                     "time_ratio": round(ms / base_ms, 4), "flop_ratio": round(flops[k] / base_flops, 4),
                     "time_vs_flop": round((ms / base_ms) / (flops[k] / base_flops), 4)})
    return rows


def bench_tracking(config: str, overrides: list[str] | None, repeats: int) -> dict:
    from core.config import load_config
    from core.train import train

    cfg_on = load_config(config, overrides)
    cfg_off = cfg_on.model_copy(deep=True)
    cfg_off.probe.enabled = False
    steps = cfg_on.train.steps
    off, on = [], []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        for r in range(repeats):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                print(f"bench tracking: repeat {r + 1}/{repeats}, tracking {mode}", file=sys.stderr)
                if mode == "off":
                    off.append(train(cfg_off, track=False, progress=True).wall_s * 1000 / steps)
                else:
                    on.append(train(cfg_on, tracking_uri=uri, progress=True).wall_s * 1000 / steps)
    off_ms, on_ms = statistics.median(off), statistics.median(on)
    return {"steps": steps, "probe_every": cfg_on.probe.every, "repeats": repeats,
            "off_ms": round(off_ms, 3), "on_ms": round(on_ms, 3), "ratio": round(on_ms / off_ms, 4),
            "off_all_ms": [round(v, 3) for v in off], "on_all_ms": [round(v, 3) for v in on]}


def cmd_bench(args: argparse.Namespace) -> int:
    from core.errors import LayerLockError

    for flag, least in (("batch_size", 1), ("rounds", 1), ("steps_per_round", 1), ("warmup", 0), ("repeats", 1)):
        value = getattr(args, flag)
        if value < least:
            raise LayerLockError(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise LayerLockError(f"--threads must be at least 1, got {args.threads}")
    if args.what in OWN_LOOP_BENCHES:
        return cmd_own_loop_bench(args)
    if args.what in ("data", "cli"):
        result = bench_data(args.repeats) if args.what == "data" else bench_cli(args.repeats)
        print(json.dumps(result) if args.json else "  ".join(f"{k} {v:.3f} s" for k, v in result.items()))
        return 0
    import torch

    # freezing: one intra-op thread by default; on a small shared machine, OpenMP threads that
    # spin-wait for a busy core make step times swing by 10x and hide the compute being measured.
    threads = args.threads if args.threads is not None else (1 if args.what == "freezing" else None)
    if threads:
        torch.set_num_threads(threads)
    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
    if args.what == "freezing":
        rows = bench_freezing(args.config, args.set, args.batch_size, args.rounds, args.steps_per_round, args.warmup)
        if args.json:
            print(json.dumps(rows))
        else:
            print(f"{'frozen':>6} {'step_ms':>9} {'GFLOP':>8} {'time/k0':>8} {'flops/k0':>9} {'time/flops':>10}")
            for r in rows:
                print(f"{r['frozen']:>6} {r['step_ms']:>9.2f} {r['flops'] / 1e9:>8.3f} {r['time_ratio']:>8.3f} "
                      f"{r['flop_ratio']:>9.3f} {r['time_vs_flop']:>10.3f}")
    else:
        result = bench_tracking(args.config, args.set, args.repeats)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"steps {result['steps']}, probe.every {result['probe_every']}, {result['repeats']} repeats each")
            print(f"off_ms {result['off_ms']:.2f}  on_ms {result['on_ms']:.2f}  ratio {result['ratio']:.4f}")
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
    p.add_argument("what", choices=["freezing", "tracking", "data", "cli", *OWN_LOOP_BENCHES])
    p.add_argument("--config", default="experiments/configs/mae_tiny.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--batch-size", type=int, default=64, help="freezing: clips per step")
    p.add_argument("--rounds", type=int, default=6, help="freezing: interleaved rounds over all k")
    p.add_argument("--steps-per-round", type=int, default=5, help="freezing: timed steps per k per round")
    p.add_argument("--warmup", type=int, default=2, help="freezing: untimed steps after each freeze change")
    p.add_argument("--repeats", type=int, default=3, help="tracking: runs of each mode, alternated; data, cli: repeats")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: 1 for freezing, torch's default for tracking)")
    add_own_loop_args(p)
    p.set_defaults(func=cmd_bench)


# ----------------------------------------------------------------------------- own loop (bench_own_loop.py)

OWN_LOOP_BENCHES = ("monitor", "own-freezing")


def add_own_loop_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["vit", "video"], default="vit",
                   help="monitor, own-freezing: the README example's torchvision model")
    p.add_argument("--every", type=int, default=50, help="monitor, own-freezing: probe interval in steps")
    p.add_argument("--steps", type=int, default=None,
                   help="monitor, own-freezing: steps per run (300 for vit, 200 for video)")


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
                                                   args.repeats, min(args.every, 20), args.steps)
        show = bench_own_loop.print_own_freezing
    if args.json:
        print(json.dumps(result))
    else:
        show(result)
    return 0
