"""Command-line entry points: ``python -m experiments <command> ...``.

Library code raises; this is the one layer that turns a bad input (``LayerLockError``) into one
line on stderr and exit code 2. The MLflow run id is always the last stdout line of a run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from core.errors import LayerLockError, RunTerminated, TrainingDiverged
from experiments import config_path
from experiments.executor import RunsFailed

EXIT_BAD_INPUT = 2
EXIT_TERMINATED = 128 + 15  # what a shell reports for a process ended by SIGTERM


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )


def cmd_pretrain(args: argparse.Namespace) -> int:
    from core.config import load_config
    from core.train import train
    from experiments.executor import options

    executor = options(args)  # bad executor options are bad input with or without --seeds
    if args.seeds is None and executor["nproc_per_run"] > 1:
        raise LayerLockError(
            "--nproc-per-run is for the runs of --seeds; train one run as N processes with "
            "`torchrun --nproc_per_node N -m experiments pretrain ...`"
        )
    if args.resume:
        if args.config or args.set:
            raise LayerLockError("--resume continues a run with its own config: drop --config/--set")
        cfg = load_config(None)
    else:
        if not args.config:
            raise LayerLockError("pretrain needs --config FILE (or --resume RUN_ID)")
        cfg = load_config(config_path(args.config), args.set)
    tags = parse_tags(args.tag)
    if args.seeds is not None:
        return _pretrain_seeds(args, cfg, tags)
    result = train(cfg, tracking_uri=args.tracking_uri, resume_run_id=args.resume, tags=tags)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if not result.run_id:  # a non-zero torchrun rank: rank 0 reports
        return 0
    print(
        f"finished {result.steps} steps, final loss {result.final_loss:.4f}, "
        f"{result.wall_s:.1f} s, {result.flops / 1e12:.3f} TFLOP",
        file=sys.stderr,
    )
    print(result.run_id)
    return 0


def parse_tags(pairs: list[str] | None) -> dict[str, str]:
    """``--tag key=value`` pairs -> dict; a pair without '=' or with an empty key is bad input."""
    tags: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LayerLockError(f"--tag expects key=value, got '{pair}'")
        tags[key.strip()] = value
    return tags


def _pretrain_seeds(args: argparse.Namespace, cfg, tags: dict[str, str]) -> int:
    """``pretrain --seeds 0,1,2``: one run per seed, one group, through the executor; the run ids
    printed in the order of the seeds once all have finished."""
    import os

    from core.config import group_name, parse_overrides
    from experiments.executor import options
    from experiments.seeds import TAG_GROUP, parse_seeds, train_seeds

    executor = options(args)
    if args.resume:
        raise LayerLockError("--seeds trains new runs: drop --resume")
    if "seed" in (parse_overrides(args.set).get("train") or {}):
        raise LayerLockError("--seeds and --set train.seed=... both choose the seed: keep one")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and executor["executor"] != "serial":
        raise LayerLockError(
            "under torchrun every run of --seeds uses all the processes: add --executor serial "
            "(or run without torchrun and pass --nproc-per-run N)"
        )
    seeds = parse_seeds(args.seeds)
    print(f"group {tags.get(TAG_GROUP, group_name(cfg))}: seeds {', '.join(map(str, seeds))}", file=sys.stderr)

    results = train_seeds(cfg, seeds, tracking_uri=args.tracking_uri, tags=tags, **executor)
    for result in results:  # in the order of --seeds; a non-zero torchrun rank has no run id
        if result.run_id:
            print(result.run_id)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def build_parser(prog: str = "python -m experiments") -> argparse.ArgumentParser:
    from experiments.executor import add_options as add_executor_options

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train one run (MAE, LayerLock or naive latent) and log it to MLflow")
    p.add_argument("--config", help="YAML config, e.g. experiments/configs/mae_tiny.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue a run from its latest checkpoint")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="extra MLflow tag (repeatable)")
    p.add_argument(
        "--seeds",
        metavar="S,S,...",
        help="train one run per seed (e.g. 0,1,2), all tagged with one layerlock.group, through "
        "--executor; prints each run id",
    )
    add_executor_options(p)
    _add_tracking(p)
    p.set_defaults(func=cmd_pretrain)

    for register in _extra_commands():
        register(sub, _add_tracking)
    return parser


def _extra_commands() -> list[Callable]:
    """Other subcommands live in their own modules; each exposes ``register(sub, add_tracking)``."""
    from experiments import bench, demo, evaluate, freeze_test, study, sync

    return [freeze_test.register, evaluate.register, demo.register, study.register, bench.register, sync.register]


def main(argv: list[str] | None = None, prog: str = "python -m experiments") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LayerLockError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunsFailed as err:
        print("\n".join(err.lines()), file=sys.stderr)
        return 1
    except TrainingDiverged as err:
        print(f"error: training diverged: {err} (run marked FAILED)", file=sys.stderr)
        return 1
    except RunTerminated as err:
        print(f"terminated: {err}", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
