"""Counted FLOPs of one training step as a function of the schedule stage k.

Stage k is the schedule's ``frozen`` count at a step. For objectives that freeze (all but
``latent_scheduled``) it is the frozen-prefix length: blocks 0..k-1 save their backward and,
for layerlock, a k-block target forward over all tokens is added. For ``latent_scheduled`` the
per-k entries mean "stage k", not "k frozen": nothing is frozen (no backward saving) and the
k-block target forward over all tokens is added on top of the full step.

Counting runs the real training step (forward, losses including the latent-target forward,
backward) under ``torch.utils.flop_counter.FlopCounterMode`` on a copy of the model on the
``meta`` device: shapes only, so it costs milliseconds and no memory, and the count follows
the code path instead of a hand-written formula.

Any model (:func:`count_flop_model`): the caller's own training step (forward and loss on a
fixed batch; the backward is added here) is counted the same way for every frozen-prefix length
of a list of blocks, on the real model, and everything the count changes is put back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from core.config import ExperimentConfig
from core.errors import LayerLockError
from core.freezing import (
    STEM_LAST,
    STEM_NEVER,
    STEM_WITH_FIRST,
    FrozenSet,
    freeze_prefix,
    frozen_prefix_length,
    prefix_set,
    set_frozen,
)
from core.masking import n_keep
from core.model import build_model
from core.objectives import compute_losses, freezes
from core.probes import rng_preserved

PREFIX_MEANING = "k = blocks 0..k-1 frozen"


def count_step_flops(cfg: ExperimentConfig, batch_size: int, k: int, frozen: FrozenSet | None = None) -> int:
    """FLOPs of one optimizer step's forward+backward for ``batch_size`` clips at schedule stage ``k``.

    ``frozen``: what is frozen (default: blocks 0..k-1 with the stem, for objectives that freeze).
    Counted on the real code path, so a frozen set that is not a prefix with its stem (the stem
    trainable, or a block above a trainable one) saves only its weight gradients: the input
    gradients still run through it, and the count shows exactly that."""
    g = cfg.geometry
    with torch.device("meta"):
        model = build_model(cfg.model, g)
    if frozen is None:
        frozen = prefix_set(k if freezes(cfg.objective) else 0)
    set_frozen(model, None, frozen)
    kept = n_keep(g.grid, cfg.model.mask_ratio)
    video = torch.empty(batch_size, g.channels, g.frames, g.size, g.size, device="meta")
    keep = torch.zeros(batch_size, kept, dtype=torch.long, device="meta")
    mask = torch.zeros(batch_size, g.n_tokens - kept, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        losses = compute_losses(model, model, video, keep, mask, cfg.objective, stage=k)
        losses["loss"].backward()
    return int(counter.get_total_flops())


def flop_model(
    cfg: ExperimentConfig, batch_size: int | None = None, stem: str = STEM_WITH_FIRST, last_frozen: int | None = None
) -> dict:
    """The run's FLOP model: per-step FLOPs for every schedule stage k = 0..depth-1.

    ``stem``/``last_frozen``: the schedule's stem policy and deepest stage (:func:`core.freezing.prefix_set`);
    with ``never`` (or ``last`` before the last stage) the stem trains and stage k saves only the
    weight gradients of blocks 0..k-1, so per_step[k] is counted with that set."""
    b = batch_size or cfg.train.batch_size
    freezing = freezes(cfg.objective)
    per = {
        str(k): count_step_flops(cfg, b, k, prefix_set(k, stem, last_frozen) if freezing else FrozenSet())
        for k in range(cfg.model.depth)
    }
    meaning = PREFIX_MEANING if freezing else "k = schedule stage (latent target = block k-1 output); nothing frozen"
    out = {
        "n_blocks": cfg.model.depth,
        "batch_size": b,
        "objective": cfg.objective.name,
        "per_step": per,
        "per_step_k": meaning,
    }
    if freezing:  # what stage k costs when the stem trains (freeze.stem: never, or last before its stage)
        out["per_step_stem_trains"] = {
            str(k): count_step_flops(cfg, b, k, prefix_set(k, STEM_NEVER)) for k in range(cfg.model.depth)
        }
    if stem != STEM_WITH_FIRST:
        out["stem"] = stem
        out["per_step_k"] += f"; stem {stem}" + (f" (frozen at k={last_frozen})" if stem == STEM_LAST else "")
    return out


def variant_saving(cfg: ExperimentConfig, frozen: FrozenSet, batch_size: int | None = None) -> dict:
    """What freezing ``frozen`` saves per step against nothing frozen, counted: ``flops_frozen``,
    ``flops_full``, ``saving`` (``1 - frozen / full``). A freeze-test variant's honest saving: a
    set whose stem trains, or a block above a trainable one, saves only weight gradients."""
    b = batch_size or cfg.train.batch_size
    full = count_step_flops(cfg, b, 0, FrozenSet())
    part = count_step_flops(cfg, b, 0, frozen)
    return {"flops_full": full, "flops_frozen": part, "saving": 1.0 - part / full}


@contextlib.contextmanager
def kept_as_is(
    model: nn.Module, blocks: Sequence[nn.Module], stem: Iterable[nn.Module | nn.Parameter] = (), weights: bool = False
) -> Iterator[None]:
    """Run real training steps on ``model`` and put back, afterwards: the frozen prefix of
    ``blocks`` (with ``stem``), every parameter's gradient, the buffers (BatchNorm statistics),
    the RNG and, with ``weights``, the parameters' values, all bit for bit."""
    blocks, stem = list(blocks), list(stem)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    values = [p.detach().clone() for p in params] if weights else None
    buffers = [b.detach().clone() for b in model.buffers()]
    k_before = frozen_prefix_length(blocks)
    try:
        with rng_preserved([model]):
            yield
    finally:
        freeze_prefix(blocks, k_before, None, stem=stem)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.grad = grads[i]
                if values is not None:
                    p.copy_(values[i])
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)


def count_flop_model(
    blocks: Sequence[nn.Module],
    train_step: Callable[[], torch.Tensor],
    *,
    model: nn.Module,
    stem: Iterable[nn.Module | nn.Parameter] = (),
) -> dict:
    """The FLOP model of any model's training step: counted FLOPs for every k = 0..n-1 frozen blocks.

    ``train_step()`` runs the caller's forward and loss on one fixed training batch and returns
    the loss; for each k, blocks 0..k-1 (and ``stem``) are frozen with
    :func:`core.freezing.freeze_prefix`, and ``train_step()`` plus ``loss.backward()`` run under
    ``FlopCounterMode``. This runs n real steps without an optimizer update; afterwards the
    frozen prefix, every gradient of ``model``, its buffers (BatchNorm statistics) and the RNG
    are as they were, so the training run that follows is the same bit for bit.
    The optimizer's step is not counted (it is elementwise).
    """
    blocks = list(blocks)
    per_step: dict[str, int] = {}
    with kept_as_is(model, blocks, stem):
        for k in range(len(blocks)):
            freeze_prefix(blocks, k, None, stem=stem)
            for p in model.parameters():
                p.grad = None
            counter = FlopCounterMode(display=False)
            with counter:
                loss = train_step()
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise LayerLockError("train_step must return the loss, a tensor with one element")
                loss.backward()
            per_step[str(k)] = int(counter.get_total_flops())
    return {
        "n_blocks": len(blocks),
        "per_step": per_step,
        "per_step_k": PREFIX_MEANING,
        "counted": "FlopCounterMode on the caller's training step (forward, loss, backward)",
    }
