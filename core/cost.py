"""What the caller's training step costs: :class:`CostSpec`, and its measured time at every
frozen-prefix length on the real model, everything put back (:func:`calibrate_on_model`). The
FLOP count of the same step is :func:`core.flops.count_flop_model`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.errors import LayerLockError, first_line
from core.flops import kept_as_is
from core.freezing import freeze_prefix
from core.timemodel import StepTimer, calibrate


def check_int(name: str, value: Any, least: int) -> None:
    """LayerLockError unless ``value`` is None or an integer >= ``least``."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
        raise LayerLockError(f"{name} must be an integer >= {least}, got {value!r}")


@dataclass(frozen=True)
class CostSpec:
    """What a training step costs, for ``flop_model.json`` and ``time_model.json``.

    ``train_step``: a function that runs the forward and loss on one fixed training batch and
    returns the loss; the FLOP model is counted with it for every frozen-prefix length
    (``core.flops.count_flop_model``). Without a CostSpec, ``python -m analysis schedule``
    predicts savings from an estimate (uniform per-block cost). ``stem``: modules or parameters
    before block 0 that freeze with it (as in :func:`core.freezing.freeze_prefix`).
    ``optimizer``: the loop's optimizer; the calibration steps then include an update, by an
    optimizer of the same class and settings over the same parameters (the loop's own is not
    touched). ``calibration``: time this many steps (forward, backward and, with ``optimizer``, an
    update) at each frozen-prefix length before training, interleaved
    (:func:`core.timemodel.calibrate`), on the model itself, whose weights, gradients, buffers,
    frozen prefix and RNG are then put back bit for bit; with the training steps' own times they
    make up ``time_model.json``, from which ``python -m analysis schedule`` predicts a schedule's
    wall-time saving. 0: none."""

    train_step: Callable[[], torch.Tensor]
    stem: Iterable[nn.Module | nn.Parameter] = ()
    optimizer: torch.optim.Optimizer | None = None
    calibration: int = 5

    def __post_init__(self) -> None:
        check_int("calibration", self.calibration, 0)


def calibrate_on_model(cost: CostSpec, blocks: Sequence[nn.Module], model: nn.Module, timer: StepTimer) -> str:
    """Time ``cost.calibration`` steps at each calibrated frozen-prefix length (at most 8, spread
    over the depth) into ``timer``'s calibration record, interleaved; everything the steps change
    is put back (:func:`core.flops.kept_as_is`). Returns what a timed step is, in words."""
    n, stem = len(blocks), list(cost.stem)
    stages = sorted({round(i * (n - 1) / 7) for i in range(8)}) if n > 8 else list(range(n))
    shadow = optimizer_like(cost.optimizer) if cost.optimizer is not None else None
    cuda = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
    params = list(model.parameters())

    def step(_i: int) -> None:
        loss = cost.train_step()
        loss.backward()
        if shadow is not None:
            shadow.step()
        for p in params:
            p.grad = None

    with kept_as_is(model, blocks, stem, weights=True):
        calibrate(
            timer,
            stages,
            cost.calibration,
            lambda k: freeze_prefix(blocks, k, shadow, stem=stem),
            step,
            (lambda: torch.cuda.synchronize(cuda)) if cuda is not None else None,
        )
    update = f" and {type(cost.optimizer).__name__} update" if shadow is not None else ""
    return f"forward, loss, backward{update} on the fixed batch of train_step"


def optimizer_like(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """A new optimizer of ``optimizer``'s class and parameter groups (settings included), with no
    state; None, with a warning, where its class cannot be built that way."""
    groups = [dict(g) for g in optimizer.param_groups]
    try:
        return type(optimizer)(groups)
    except Exception as err:  # noqa: BLE001 -- any constructor: the calibration then leaves the update out
        warnings.warn(
            f"LayerMonitor: cannot build a {type(optimizer).__name__} for the timing calibration "
            f"({first_line(err)}); it times forward and backward only",
            stacklevel=3,
        )
        return None
