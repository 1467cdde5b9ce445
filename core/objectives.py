"""Training objectives: ``pixel`` (MAE), ``layerlock``, ``latent_naive`` and ``latent_scheduled``.

All losses are mean squared errors at the *masked* positions. Latent targets are normalised per
token (layer norm without affine) and never receive gradients.

The freezing schedule gives a *stage* ``k`` at every step (its ``frozen`` count). One mechanism
reads it: objectives that freeze (:func:`freezes`) freeze blocks 0..k-1 at stage k; the latent
target depth comes from the objective and k (:func:`latent_target_block`):

* ``pixel``: freezes the prefix, no latent target;
* ``layerlock``: freezes the prefix; from stage 1 on, the target is the output of block k-1;
* ``latent_scheduled`` (ablation): the same target schedule as layerlock, pixel loss kept, but
  nothing is frozen, so the target comes from the trainable network (under no_grad) and drifts
  with the student;
* ``latent_naive``: target = output of ``latent_block`` of the same trainable network at every
  step (the collapse baseline; given a schedule it freezes like ``pixel``).

Any model: :func:`latent_loss` is LayerLock's latent loss over a list of blocks (the public API,
docs/integrations.md); :func:`compute_losses`, the trainer's, calls it with this project's
``VideoMAE``, and the framework callbacks (``core.integrations``) with a user's model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import ObjectiveConfig
from core.errors import LayerLockError
from core.freezing import is_int
from core.masking import apply_masks
from core.model import VideoMAE

PIX_EPS = 1e-6  # MAE's norm_pix_loss: (x - mean) / sqrt(var + 1e-6), unbiased variance per patch


def normalise_patches(patches: torch.Tensor, norm: bool = True) -> torch.Tensor:
    """Per-patch normalisation of ``patches (..., patch_dim)`` (MAE's ``norm_pix_loss``).

    ``(x - mean) / sqrt(var + 1e-6)`` with the unbiased variance, computed as a scaled layer
    norm (biased variance): with ``c = (n - 1) / n``, ``sqrt(c) * layer_norm(x, eps=1e-6 * c)``
    is the same number. One fused kernel: on CPU ``var`` alone cost 7x the whole layer norm.
    """
    if not norm:
        return patches
    n = patches.shape[-1]
    c = (n - 1) / n
    return F.layer_norm(patches, (n,), eps=PIX_EPS * c) * math.sqrt(c)


class _PrefixDone(Exception):
    """Raised by :func:`prefix_output`'s hook to stop a forward after the block it needs."""


def prefix_output(blocks: Sequence[nn.Module], k: int, forward: Callable[[], Any]) -> torch.Tensor:
    """Run ``forward()`` (the model's stem and blocks on the *unmasked* input) only as far as
    ``blocks[k-1]`` and return that block's output: a forward hook stops the forward there, so
    blocks k.. (and any head) cost nothing. A block that returns a tuple (Hugging Face layers)
    gives its first element. For models whose forward can stop at a depth itself (this project's
    ``VideoMAE.forward_encoder(..., upto=k)``) that is simpler; this works on any model."""
    blocks = list(blocks)
    if not 1 <= k <= len(blocks):
        raise LayerLockError(
            f"the latent target is the output of block {k - 1}, which does not exist: "
            f"the model has {len(blocks)} blocks (0..{len(blocks) - 1})"
        )
    seen: list[torch.Tensor] = []

    def stop(_module: nn.Module, _args: tuple, output: Any) -> None:
        seen.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _PrefixDone

    handle = blocks[k - 1].register_forward_hook(stop)
    try:
        forward()
    except _PrefixDone:
        pass
    finally:
        handle.remove()
    if not seen:
        raise LayerLockError(
            f"block {k - 1} did not run in the target forward: are the blocks the model's own, in depth order?"
        )
    return seen[0]


@torch.no_grad()
def latent_target(blocks: Sequence[nn.Module], k: int, run_prefix: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """LayerLock's latent target: the output of block ``k-1`` on the *unmasked* input, normalised
    per token (layer norm without affine), under ``no_grad``: ``(B, N, dim)``.

    ``run_prefix(k)`` runs the stem and blocks 0..k-1 on the unmasked input and returns block
    k-1's output as ``(B, N, dim)`` (tokens). For LayerLock, blocks 0..k-1 are frozen, so the
    target cannot drift with the student; for ``latent_scheduled`` and ``latent_naive`` they
    train, and the target drifts with them.
    """
    n = len(blocks)
    if not 1 <= k <= n:
        raise LayerLockError(
            f"the latent target is the output of block {k - 1}, which does not exist: "
            f"the model has {n} blocks (0..{n - 1})"
        )
    out = run_prefix(k)
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LayerLockError(f"run_prefix({k}) must return block {k - 1}'s output as (batch, tokens, dim), got {shape}")
    return F.layer_norm(out.float(), out.shape[-1:])


def latent_loss(
    blocks: Sequence[nn.Module],
    stage: int,
    run_prefix: Callable[[int], torch.Tensor],
    predictions: torch.Tensor,
    mask_idx: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """LayerLock's latent loss on any model, to add (weighted) to the model's own pixel loss.

    ``blocks``: the encoder blocks in depth order. ``stage``: the schedule's stage k at this step
    (for LayerLock the frozen-prefix length; :func:`latent_target_block` for the other
    objectives). ``run_prefix(k)``: runs the stem and blocks 0..k-1 on the *unmasked* input and
    returns block k-1's output ``(B, N, dim)`` (:func:`prefix_output` does it for any model).
    ``predictions``: the student's latent predictions at the masked positions ``(B, K, dim)``;
    ``mask_idx (B, K)``: those positions' token indices (None: ``predictions`` covers all N).

    Returns the mean squared error against :func:`latent_target` at the masked positions, or None
    at stage 0 (nothing frozen yet: the pixel loss alone). The target costs a forward of the stem
    and k blocks over all N tokens, under ``no_grad`` (docs/integrations.md, "What it costs").
    """
    if not is_int(stage) or stage < 0:
        raise LayerLockError(f"stage must be a non-negative integer (the frozen-prefix length), got {stage!r}")
    if stage == 0:
        return None
    target = latent_target(blocks, stage, run_prefix)
    if mask_idx is not None:
        target = apply_masks(target, mask_idx)
    if predictions.shape != target.shape:
        raise LayerLockError(
            f"latent predictions have shape {tuple(predictions.shape)}, the target (block "
            f"{stage - 1}'s output at the masked positions) {tuple(target.shape)}: they must match"
        )
    return F.mse_loss(predictions.float(), target)


def freezes(cfg: ObjectiveConfig) -> bool:
    """Whether stage k of the schedule freezes blocks 0..k-1 (every objective but ``latent_scheduled``)."""
    return cfg.name != "latent_scheduled"


def latent_target_block(cfg: ObjectiveConfig, model: VideoMAE, stage: int) -> int:
    """How many blocks the latent target runs through at schedule stage ``stage`` (0: no latent loss)."""
    depth = len(model.blocks)
    if cfg.name in ("layerlock", "latent_scheduled"):
        return stage
    if cfg.name == "latent_naive":
        return cfg.latent_block % depth + 1
    return 0


def compute_losses(
    net: torch.nn.Module,
    model: VideoMAE,
    video: torch.Tensor,
    keep_idx: torch.Tensor,
    mask_idx: torch.Tensor,
    cfg: ObjectiveConfig,
    stage: int | None = None,
) -> dict[str, torch.Tensor]:
    """Forward pass and losses for one batch at schedule stage ``stage``.

    ``net`` is what runs the forward (the model, or its DDP/compiled wrapper); ``model`` is the
    bare module used for targets. ``stage=None`` means the model's frozen prefix, which is the
    stage for objectives that freeze; ``latent_scheduled`` freezes nothing and needs it given.
    Returns ``loss`` and the parts ``loss_pixel`` and, once a latent target exists, ``loss_latent``.
    """
    if stage is None:
        if not freezes(cfg):
            raise LayerLockError(f"objective {cfg.name} freezes nothing: pass the schedule stage explicitly")
        stage = model.frozen_prefix
    k = latent_target_block(cfg, model, stage)
    patches = model.patchify(video)  # once: the encoder's input and the pixel target
    # Predictions at the masked tokens only (B, N_mask, ...): the only ones the losses read.
    pix_pred, lat_pred = net(patches, keep_idx, with_latent=k > 0, pred_idx=mask_idx)
    out: dict[str, torch.Tensor] = {}
    target = normalise_patches(apply_masks(patches, mask_idx), cfg.norm_pix_loss)
    loss_pixel = F.mse_loss(pix_pred.float(), target.float())
    out["loss_pixel"] = loss_pixel
    loss = cfg.pixel_weight * loss_pixel
    loss_latent = latent_loss(
        model.blocks, k, lambda depth: model.forward_encoder(patches, None, upto=depth), lat_pred, mask_idx
    )
    if loss_latent is not None:
        out["loss_latent"] = loss_latent
        loss = loss + cfg.latent_weight * loss_latent
    out["loss"] = loss
    return out


HELDOUT_MASK_SEED = 20250910  # one fixed set of masks, the same for every run of a dataset


@torch.no_grad()
def heldout_pixel_loss(
    model: VideoMAE, video: torch.Tensor, mask_ratio: float, norm_pix_loss: bool = True, batch_size: int = 64
) -> float:
    """Masked-patch pixel loss of ``model`` on fixed held-out clips ``video (n, C, T, H, W)`` with
    fixed masks (generator seeded by ``HELDOUT_MASK_SEED``): the same clips and masks for every run.

    Why: a run's last logged ``train/loss`` is a mean over a few random minibatches, so it moves
    with the seed's batches (about 4% relative sd over seeds on mae_tiny, against about 0.5%
    for this loss); comparing runs or freeze tests on it mostly compares batches.
    """
    from core.masking import tube_mask

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(HELDOUT_MASK_SEED)
    total = 0.0
    for chunk in video.split(batch_size):
        keep, mask = tube_mask(chunk.shape[0], model.geometry.grid, mask_ratio, gen)
        chunk, keep, mask = chunk.to(device), keep.to(device), mask.to(device)
        patches = model.patchify(chunk)
        pred, _ = model(patches, keep, with_latent=False, pred_idx=mask)
        target = normalise_patches(apply_masks(patches, mask), norm_pix_loss)
        total += float(F.mse_loss(pred.float(), target.float())) * chunk.shape[0]
    model.train(was_training)
    return total / max(1, len(video))
