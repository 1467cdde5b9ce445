"""``python -m experiments bench freezing|tracking|profile|data|cli|monitor|own-freezing``:
side-by-side measurements in one process, printed as ratios (or JSON with ``--json``).

One module per benchmark, all timing with :mod:`experiments.bench.timing`:
freezing (step time against counted FLOPs per frozen-prefix length), tracking (probes+tracking
off and on), profile (torch.profiler of the trainer's step), data (procedural batch time), cli
(``python -m analysis`` start-up), monitor and own-freezing (the README's own-loop example with
``LayerMonitor`` and with a derived schedule).
Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

import argparse
import json

OWN_LOOP_BENCHES = ("monitor", "own-freezing")


def register(sub, add_tracking) -> None:
    p = sub.add_parser("bench", help="side-by-side measurements: step time vs FLOPs, tracking on vs off")
    p.add_argument(
        "what", choices=["freezing", "tracking", "profile", "data", "cli", *OWN_LOOP_BENCHES, "integrations"]
    )
    p.add_argument("--config", default="experiments/configs/mae_tiny.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--batch-size", type=int, default=64, help="freezing: clips per step")
    p.add_argument("--rounds", type=int, default=8, help="freezing: interleaved rounds over all k (at least)")
    p.add_argument(
        "--max-rounds",
        type=int,
        default=24,
        help="freezing: go on up to this many rounds until every ratio is resolved to --within",
    )
    p.add_argument(
        "--steps-per-round", type=int, default=5, help="freezing: timed steps per k per round; profile: profiled steps"
    )
    p.add_argument("--warmup", type=int, default=2, help="freezing, profile: untimed steps after each freeze change")
    p.add_argument("--frozen", type=int, default=None, help="profile: frozen blocks (default: depth-1)")
    p.add_argument(
        "--repeats",
        type=int,
        default=6,
        help="tracking: lock-step repeats (off and on) at least; data, cli: repeats",
    )
    p.add_argument(
        "--max-repeats",
        type=int,
        default=12,
        help="tracking: go on up to this many repeats until the ratio is resolved to --within",
    )
    p.add_argument(
        "--within",
        type=float,
        default=0.01,
        help="freezing, tracking: the resolution wanted, as a fraction (0.01: intervals within 1%%)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 for freezing, tracking, profile and the own-loop "
        "benches; torch's own otherwise)",
    )
    add_own_loop_args(p)
    p.set_defaults(func=cmd_bench)


def add_own_loop_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        choices=["vit", "video"],
        default="vit",
        help="monitor, own-freezing: the README example's torchvision model",
    )
    p.add_argument("--every", type=int, default=50, help="monitor, own-freezing: probe interval in steps")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per run: tracking 100 (the config's probe and checkpoint intervals are kept); "
        "monitor, own-freezing 300 for vit, 200 for video",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from core.errors import LayerLockError

    for flag, least in (
        ("batch_size", 1),
        ("rounds", 1),
        ("steps_per_round", 1),
        ("warmup", 0),
        ("repeats", 1),
        ("max_rounds", 1),
        ("max_repeats", 1),
        ("steps", 1),
        ("frozen", 0),
    ):
        value = getattr(args, flag)
        if value is not None and value < least:
            raise LayerLockError(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    if not 0 < args.within < 1:
        raise LayerLockError(f"--within must be a fraction in (0, 1), got {args.within}")
    if args.threads is not None and args.threads < 1:
        raise LayerLockError(f"--threads must be at least 1, got {args.threads}")
    if args.what in OWN_LOOP_BENCHES:
        return cmd_own_loop_bench(args)
    if args.what == "integrations":
        return cmd_integrations_bench(args)
    if args.what in ("data", "cli"):
        if args.what == "data":
            from experiments.bench.data import bench_data

            result = bench_data(args.repeats)
        else:
            from experiments.bench.cli import bench_cli

            result = bench_cli(args.repeats)
        print(json.dumps(result) if args.json else "  ".join(f"{k} {v:.3f} s" for k, v in result.items()))
        return 0
    import torch

    # One intra-op thread by default: on a small shared machine, OpenMP threads that spin-wait for
    # a busy core make step times swing by 10x and hide the compute being measured.
    threads = args.threads if args.threads is not None else 1
    if threads:
        torch.set_num_threads(threads)
    if args.what == "profile":
        from experiments.bench.profile import format_profile, profile_step

        result = profile_step(args.config, args.set, args.batch_size, args.frozen, args.steps_per_round, args.warmup)
        return _show(args, result, lambda r: print(format_profile(r)))
    if args.what == "freezing":
        from experiments.bench.freezing import bench_freezing, print_freezing

        result = bench_freezing(
            args.config,
            args.set,
            args.batch_size,
            args.rounds,
            args.steps_per_round,
            args.warmup,
            args.max_rounds,
            args.within,
        )
        show = print_freezing
    else:
        from experiments.bench.tracking import bench_tracking, print_tracking

        result = bench_tracking(
            args.config, args.set, args.repeats, args.steps or 100, args.max_repeats, args.within, args.threads or 1
        )
        show = print_tracking
    return _show(args, result, show)


def _show(args: argparse.Namespace, result: dict, show) -> int:
    """Print a timing bench's result (JSON or text), with the build and machine it ran on first."""
    from experiments.bench.timing import machine, machine_line

    result["machine"] = machine()
    if args.json:
        print(json.dumps(result))
    else:
        print(machine_line(result["machine"]))
        show(result)
    return 0


def cmd_own_loop_bench(args: argparse.Namespace) -> int:
    import torch

    from core.errors import LayerLockError
    from experiments.bench.own_loop import DEFAULT_STEPS

    for flag in ("every", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise LayerLockError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads or 1)  # one thread unless asked: see cmd_bench
    if args.what == "monitor":
        from experiments.bench.monitor import bench_monitor, print_monitor

        steps = args.steps or DEFAULT_STEPS[args.model]
        result = bench_monitor(args.model, steps, args.every, args.repeats)
        show = print_monitor
    else:
        from experiments.bench.own_freezing import bench_own_freezing, print_own_freezing

        result = bench_own_freezing(
            args.model,
            args.rounds,
            args.steps_per_round,
            args.warmup,
            args.repeats,
            min(args.every, 20),
            args.steps,
            args.max_rounds,
            args.within,
        )
        show = print_own_freezing
    return _show(args, result, show)


def cmd_integrations_bench(args: argparse.Namespace) -> int:
    """``bench integrations`` (experiments/bench/integrations.py): --steps per run (100), --every
    (50), --repeats interleaved pairs per callback (6)."""
    import torch

    from core.errors import LayerLockError

    steps = args.steps or 100
    if steps < 10 or (args.every is not None and args.every < 1):
        raise LayerLockError(f"bench integrations: --steps must be at least 10 and --every at least 1, got {steps}")
    torch.set_num_threads(args.threads or 1)  # one thread unless asked: see cmd_bench
    from experiments.bench.integrations import bench_integrations, print_integrations

    return _show(args, bench_integrations(steps, args.every, args.repeats), print_integrations)
