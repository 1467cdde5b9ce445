"""Convergence probes and schedule freezing in your own training loop, on models we did not write.

A plain PyTorch loop trains a torchvision model with random weights -- a small
``VisionTransformer`` classifying digits in images (``--model vit``), or torchvision's
``VideoResNet`` in mc3_18's layout with one block per stage, classifying motion direction in
clips (``--model video``) -- on the procedural moving-digits data (nothing is downloaded), with
:class:`core.monitor.LayerMonitor` attached.
The run is an MLflow run like the trainer's: ``python -m analysis convergence|schedule`` and
the dashboard read it. A derived schedule is applied in the same loop with
:func:`core.freezing.apply_schedule`::

    python -m experiments.examples.own_loop --model vit --steps 300          # prints the run id
    python -m analysis schedule --run RUN_ID --out schedule.json
    python -m experiments.examples.own_loop --model vit --steps 300 --schedule schedule.json

Everything LayerLock-specific in the loop is marked ``# LayerLock``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import LayerLockError, first_line
from core.freezing import FreezeSchedule, apply_schedule  # LayerLock
from core.monitor import CostSpec, LayerMonitor, ProbeSpec, open_writer  # LayerLock
from core.schema import TAG_DATASET
from core.tracking import Tracker

MODELS = ("vit", "video")
EXPERIMENT = "own-loop"
# Gradient norms and update ratios every 25 steps: each update ratio copies the blocks' weights
# once, 1.5% of the video ResNet's step time at every 10 steps (bench monitor).
LOG_EVERY = 25


@dataclass
class Setup:
    """A model, its blocks in depth order, what runs before block 0, and its data."""

    name: str
    model: nn.Module
    blocks: list[nn.Module]
    stem: list[nn.Module | nn.Parameter]
    inputs: torch.Tensor  # training inputs, (N, ...)
    labels: torch.Tensor  # (N,) class ids
    probe: torch.Tensor  # fixed held-out inputs for the probe
    batch_size: int
    lr: float
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9)


def moving_digits(split: str, n: int, frames: int, size: int, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` procedural clips ``(n, 3, frames, size, size)`` and their ``task`` labels (core.data)."""
    from core.config import DataConfig
    from core.data import build_dataset, get_batch

    ds = build_dataset(DataConfig(frames=frames, size=size, train_clips=max(n, 8), val_clips=max(n, 8)), split)
    video, labels = get_batch(ds, range(n))
    return video, labels[task]


def vit_setup(n_train: int = 512, n_probe: int = 32) -> Setup:
    """torchvision's VisionTransformer, tiny: 4 encoder blocks of width 32 on 32 x 32 images (16
    patches + a class token); blocks: ``encoder.layers``; stem: patch projection, class token
    and position table, which run before block 0."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    clips, labels = moving_digits("train", n_train, 1, 32, "digit")
    probe, _ = moving_digits("val", n_probe, 1, 32, "digit")
    return Setup(
        "vit",
        model,
        list(model.encoder.layers),
        [model.conv_proj, model.class_token, model.encoder.pos_embedding],
        clips[:, :, 0],
        labels,
        probe[:, :, 0],
        batch_size=32,
        lr=2e-3,
    )


def video_setup(n_train: int = 256, n_probe: int = 8) -> Setup:
    """torchvision's video ResNet in mc3_18's layout (3D convolutions in the stem and layer1,
    spatial-only ones in layer2..layer4) with one residual block per stage instead of two, so
    that it trains in seconds on a CPU; 4-frame 16 x 16 clips. Blocks: its stages (stem,
    layer1..layer4), so nothing runs before block 0. SGD with momentum, as ResNets are trained."""
    from torchvision.models.video import VideoResNet
    from torchvision.models.video.resnet import BasicBlock, BasicStem, Conv3DNoTemporal, Conv3DSimple

    torch.manual_seed(0)
    model = VideoResNet(BasicBlock, [Conv3DSimple] + [Conv3DNoTemporal] * 3, [1, 1, 1, 1], BasicStem, num_classes=8)
    clips, labels = moving_digits("train", n_train, 4, 16, "direction")
    probe, _ = moving_digits("val", n_probe, 4, 16, "direction")
    blocks = [model.stem, model.layer1, model.layer2, model.layer3, model.layer4]
    return Setup("video", model, blocks, [], clips, labels, probe, batch_size=4, lr=0.02, optimizer="sgd")


SETUPS: dict[str, Callable[[], Setup]] = {"vit": vit_setup, "video": video_setup}


def lr_at(step: int, steps: int, lr: float, warmup: int = 10) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def batch_at(s: Setup, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: a pure function of the step, so two loops see the same data."""
    idx = torch.randint(len(s.inputs), (s.batch_size,), generator=torch.Generator().manual_seed(step))
    return s.inputs[idx], s.labels[idx]


def make_optimizer(s: Setup) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(s.model.parameters(), lr=s.lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(s.model.parameters(), lr=s.lr, weight_decay=0.05)


def train(
    s: Setup,
    steps: int,
    *,
    monitor: LayerMonitor | None = None,
    schedule: FreezeSchedule | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """The plain loop: cross-entropy, ``steps`` updates. ``monitor`` and ``schedule`` are the only
    additions LayerLock needs; ``on_step(step)`` runs at the start of each step (tests)."""
    optimizer = optimizer or make_optimizer(s)
    s.model.train()
    for step in range(steps):
        train_step(s, step, steps, optimizer, monitor=monitor, schedule=schedule, on_step=on_step)


def train_step(
    s: Setup,
    step: int,
    steps: int,
    optimizer: torch.optim.Optimizer,
    *,
    monitor: LayerMonitor | None = None,
    schedule: FreezeSchedule | None = None,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """One step of :func:`train` (``bench monitor`` runs two loops' steps in turn)."""
    if schedule is not None:
        apply_schedule(schedule, s.blocks, step, optimizer, stem=s.stem)  # LayerLock: the frozen prefix now
    if on_step is not None:
        on_step(step)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, steps, s.lr)
    x, y = batch_at(s, step)
    loss = F.cross_entropy(s.model(x), y)
    loss.backward()
    if monitor is not None:
        monitor.after_backward(step)  # LayerLock: probe, gradient norms
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if monitor is not None:
        monitor.after_step(step, loss)  # LayerLock: update ratios, loss, step time


def open_run(tracking_uri: str | None = None, run_name: str | None = None) -> Tracker:
    """A new MLflow run of this example (experiment ``own-loop``), for :func:`attach_monitor`;
    ``with open_run(...) as writer:`` ends it (FINISHED, or FAILED on an error)."""
    return open_writer(
        tracking_uri=tracking_uri,
        experiment=EXPERIMENT,
        run_name=run_name,  # LayerLock
        tags={TAG_DATASET: "moving_digits"},
    )


def attach_monitor(
    s: Setup,
    steps: int,
    every: int,
    *,
    writer=None,
    count_flops: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    background: bool = False,
) -> LayerMonitor:
    """The monitor on ``s``'s blocks, probing the fixed held-out batch, logging through ``writer``
    (:func:`open_run`'s; None: the active MLflow run, else a new one the monitor ends).
    ``count_flops``: count the FLOP model on one training batch (``flop_model.json``) and time
    steps at every frozen-prefix length on it (``time_model.json``), for predicted savings;
    ``optimizer``: the loop's (its class and settings are what the timed steps use; default:
    :func:`make_optimizer`'s)."""
    x0, y0 = batch_at(s, 0)
    forward = (lambda model, batch: model(batch)) if background else s.model
    cost = (
        CostSpec(
            lambda: F.cross_entropy(s.model(x0), y0),
            stem=s.stem,  # LayerLock
            optimizer=optimizer or make_optimizer(s),
        )
        if count_flops
        else None
    )
    return LayerMonitor(  # LayerLock
        s.blocks,
        ProbeSpec(s.probe, forward, every=every, background=background),
        model=s.model,
        writer=writer,
        cost=cost,
        log_every=LOG_EVERY,
        total_steps=steps,
        params={"train.batch_size": s.batch_size, "example.model": s.name},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.examples.own_loop", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="vit")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=20, help="probe interval in steps")
    p.add_argument("--schedule", default=None, help="a schedule JSON (python -m analysis schedule --out ...)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    args = p.parse_args(argv)
    try:
        if args.steps < 1 or args.every < 1:
            raise LayerLockError(f"--steps and --every must be at least 1, got {args.steps} and {args.every}")
        schedule = None
        if args.schedule:
            schedule = FreezeSchedule.load(args.schedule)  # LayerLock: validated, the same JSON as the trainer's
            schedule.check_within(args.steps)
        s = SETUPS[args.model]()
        if schedule is not None and schedule.n_blocks != len(s.blocks):
            raise LayerLockError(
                f"{args.schedule}: the schedule is for {schedule.n_blocks} blocks, "
                f"--model {args.model} has {len(s.blocks)}"
            )
        optimizer = make_optimizer(s)
        with (
            open_run(args.tracking_uri, f"{args.model}-own-loop") as writer,
            attach_monitor(s, args.steps, args.every, writer=writer, optimizer=optimizer) as monitor,
        ):
            train(s, args.steps, monitor=monitor, schedule=schedule, optimizer=optimizer)
    except LayerLockError as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    print(json.dumps({"model": args.model, "steps": args.steps, "wall_s": round(monitor.wall_s, 2)}), file=sys.stderr)
    print(monitor.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
