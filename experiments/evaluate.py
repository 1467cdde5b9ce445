"""``python -m experiments evaluate --run RUN_ID``: probe a run's final encoder, log ``eval/...``.

Loads the run's latest checkpoint, rebuilds the encoder from the checkpoint's config, fits the
readouts of ``core.readout`` on frozen features of the run's dataset, logs the metrics into the
same run (at the checkpoint's step, i.e. ``train.steps`` for a finished run) and prints a
table with chance levels. ``--random-baseline`` adds a column for a randomly initialised
encoder of the same shape, scored on the same clips (printed, not logged).

Python API for other commands (the demo): :func:`evaluate_run` and :func:`random_init_baseline`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from core.checkpoint import encoder_from_checkpoint
from core.config import ExperimentConfig
from core.errors import LayerLockError
from core.model import VideoMAE, build_model
from core.readout import EvalData, evaluate_encoder, load_eval_data
from core.tracking import log_metrics_to_run, resolve_uri
from core.train import load_run_checkpoint, pick_device

ProbeChoice = Literal["attentive", "linear", "both"]


# ----------------------------------------------------------------------------- python API


def load_run_encoder(
    run_id: str, tracking_uri: str | None = None, *, step: int | None = None, device: str = "auto"
) -> tuple[VideoMAE, ExperimentConfig, int]:
    """A run's checkpoint (the latest, or the one after ``step`` updates) as
    ``(model in eval mode, config, step)``.

    Raises RunNotFoundError / LayerLockError (unknown run, no such checkpoint, bad config).
    """
    ckpt = load_run_checkpoint(run_id, step=step, tracking_uri=tracking_uri)
    model, cfg, ckpt_step = encoder_from_checkpoint(ckpt, f"checkpoint of run {run_id}")
    # "auto", not the run's train.device: a run trained on a GPU can be evaluated on a laptop.
    model.to(pick_device(device)).eval()
    return model, cfg, ckpt_step


def log_eval_metrics(run_id: str, metrics: dict[str, float], step: int, tracking_uri: str | None = None) -> None:
    """Write ``eval/...`` metrics into an existing run without changing its status."""
    log_metrics_to_run(run_id, metrics, step, tracking_uri)


def evaluate_run(
    run_id: str,
    tasks: Sequence[str] | None = None,
    per_block: bool = False,
    tracking_uri: str | None = None,
    *,
    probe: ProbeChoice = "attentive",
    train_clips: int | None = None,
    val_clips: int | None = None,
    seed: int = 0,
    data: EvalData | None = None,
    log: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Probe the final encoder of a run; returns (and with ``log`` stores) its ``eval/...`` metrics.

    ``data``: probe clips from :func:`core.readout.load_eval_data` to share between runs of the
    same dataset (drawn here when None). See :func:`core.readout.evaluate_encoder` for the keys.
    """
    model, cfg, step = load_run_encoder(run_id, tracking_uri)
    metrics = evaluate_encoder(
        model,
        cfg,
        tasks,
        per_block=per_block,
        probe=probe,
        train_clips=train_clips,
        val_clips=val_clips,
        seed=seed,
        data=data,
        progress=progress,
    )
    if log:
        log_eval_metrics(run_id, metrics, step, tracking_uri)
    return metrics


def random_init_baseline(
    cfg: ExperimentConfig,
    tasks: Sequence[str] | None = None,
    *,
    init_seed: int | None = None,
    probe: ProbeChoice = "attentive",
    per_block: bool = False,
    train_clips: int | None = None,
    val_clips: int | None = None,
    seed: int = 0,
    data: EvalData | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """:func:`core.readout.evaluate_encoder` on a randomly initialised encoder of ``cfg``'s shape.

    ``init_seed`` defaults to ``cfg.train.seed``: training seeds torch with it right before
    building the model, so the baseline is normally the run's own step-0 weights. The global RNG
    state is restored afterwards. Pass the same ``data`` as for the trained run so both are
    scored on the same clips.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed if init_seed is None else init_seed)
        model = build_model(cfg.model, cfg.geometry)
    model.to(pick_device("auto")).eval()
    return evaluate_encoder(
        model,
        cfg,
        tasks,
        per_block=per_block,
        probe=probe,
        train_clips=train_clips,
        val_clips=val_clips,
        seed=seed,
        data=data,
        progress=progress,
    )


# ----------------------------------------------------------------------------- table


def _chance(data: EvalData, key: str) -> float | None:
    """Chance level of a metric key ``eval/<task>/[block_03/]<metric>``."""
    parts = key.split("/")
    task, metric = parts[1], parts[-1]
    if task not in data.tasks:
        return None
    if metric == "linear_acc":
        metric = "acc"
    return data.chance(task).get(metric)


def format_table(metrics: dict[str, float], data: EvalData, baseline: dict[str, float] | None = None) -> str:
    """Plain-text table: task, metric, value (and random-init value), chance level.

    Higher is better for ``acc`` and ``delta1``; lower for ``absrel``.
    """
    header = ["task", "metric", "value"] + (["random init"] if baseline is not None else []) + ["chance"]
    rows = [header]
    for key, value in metrics.items():
        _, task, *rest = key.split("/")
        chance = _chance(data, key)
        row = [task, "/".join(rest), f"{value:.3f}"]
        if baseline is not None:
            row.append(f"{baseline[key]:.3f}" if key in baseline else "-")
        row.append("-" if chance is None else f"{chance:.3f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def _parse_tasks(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    names = [t.strip() for t in raw.split(",") if t.strip()]
    if not names:
        raise LayerLockError("--tasks is empty; give comma-separated task names, e.g. digit,direction")
    return names


def cmd_evaluate(args: argparse.Namespace) -> int:
    # MLflow's per-download progress bar would clutter stderr (and the one-line error contract).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tasks = _parse_tasks(args.tasks)
    for flag in ("train_clips", "val_clips"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise LayerLockError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    model, cfg, step = load_run_encoder(args.run, args.tracking_uri)
    data = load_eval_data(cfg, tasks, train_clips=args.train_clips, val_clips=args.val_clips)
    n_train, n_val = len(data.train_video), len(data.val_video)
    print(
        f"evaluating run {args.run} ({cfg.data.name}, depth {cfg.model.depth}, dim {cfg.model.dim}) "
        f"on {n_train} train / {n_val} val clips",
        file=sys.stderr,
    )
    metrics = evaluate_encoder(model, cfg, tasks, per_block=args.per_block, probe=args.probe, seed=args.seed, data=data)
    log_eval_metrics(args.run, metrics, step, args.tracking_uri)
    baseline = None
    if args.random_baseline:
        baseline = random_init_baseline(
            cfg, tasks, probe=args.probe, per_block=args.per_block, seed=args.seed, data=data
        )
    print(format_table(metrics, data, baseline))
    print(
        f"logged {len(metrics)} eval metrics at step {step} to run {args.run} ({resolve_uri(args.tracking_uri)})",
        file=sys.stderr,
    )
    return 0


def register(sub: argparse._SubParsersAction, add_tracking: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "evaluate",
        help="probe a run's frozen encoder (attentive/linear/depth) and log eval/ metrics",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--run", required=True, metavar="RUN_ID", help="MLflow run id with checkpoints")
    p.add_argument("--tasks", metavar="A,B", help="comma-separated tasks (default: all of the run's dataset)")
    p.add_argument(
        "--per-block",
        action="store_true",
        help="also probe every block's output (lighter probe), logs eval/<task>/block_03/<metric>",
    )
    p.add_argument(
        "--probe",
        choices=["attentive", "linear", "both"],
        default="attentive",
        help="classification readout (depth always uses the per-token dense probe)",
    )
    p.add_argument("--train-clips", type=int, metavar="N", help="probe training clips (default 1024 or fewer)")
    p.add_argument("--val-clips", type=int, metavar="N", help="probe validation clips (default 256 or fewer)")
    p.add_argument("--seed", type=int, default=0, help="probe initialisation and minibatch seed")
    p.add_argument(
        "--random-baseline",
        action="store_true",
        help="also score a random-init encoder of the same shape on the same clips (not logged)",
    )
    add_tracking(p)
    p.set_defaults(func=cmd_evaluate)


__all__ = ["evaluate_run", "format_table", "load_run_encoder", "log_eval_metrics", "random_init_baseline", "register"]
