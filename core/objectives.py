"""Training objectives: ``pixel`` (MAE), ``layerlock`` and ``latent_naive``.

All losses are mean squared errors at the *masked* positions. Latent targets are normalised per
token (layer norm without affine) and never receive gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.config import ObjectiveConfig
from core.masking import apply_masks
from core.model import VideoMAE


def pixel_target(model: VideoMAE, video: torch.Tensor, norm: bool = True) -> torch.Tensor:
    """Patchified pixels ``(B, N, patch_dim)``, normalised per patch (MAE's ``norm_pix_loss``)."""
    target = model.patchify(video)
    if norm:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target


@torch.no_grad()
def latent_target(model: VideoMAE, video: torch.Tensor, k: int) -> torch.Tensor:
    """Output of block ``k-1`` on the *unmasked* clip, normalised per token: ``(B, N, dim)``.

    For LayerLock, blocks 0..k-1 are frozen, so the target cannot drift with the student.
    """
    out = model.forward_encoder(video, None, upto=k)
    return F.layer_norm(out.float(), out.shape[-1:])


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask_idx: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(apply_masks(pred.float(), mask_idx), apply_masks(target.float(), mask_idx))


def latent_target_block(cfg: ObjectiveConfig, model: VideoMAE) -> int:
    """How many blocks the latent target runs through (0: no latent loss at this point)."""
    depth = len(model.blocks)
    if cfg.name == "layerlock":
        return model.frozen_prefix
    if cfg.name == "latent_naive":
        return cfg.latent_block % depth + 1
    return 0


def compute_losses(net: torch.nn.Module, model: VideoMAE, video: torch.Tensor, keep_idx: torch.Tensor,
                   mask_idx: torch.Tensor, cfg: ObjectiveConfig) -> dict[str, torch.Tensor]:
    """Forward pass and losses for one batch.

    ``net`` is what runs the forward (the model, or its DDP/compiled wrapper); ``model`` is the
    bare module used for targets. Returns ``loss`` and the parts ``loss_pixel`` and, once a
    latent target exists, ``loss_latent``.
    """
    k = latent_target_block(cfg, model)
    pix_pred, lat_pred = net(video, keep_idx, with_latent=k > 0)
    out: dict[str, torch.Tensor] = {}
    loss_pixel = masked_mse(pix_pred, pixel_target(model, video, cfg.norm_pix_loss), mask_idx)
    out["loss_pixel"] = loss_pixel
    loss = cfg.pixel_weight * loss_pixel
    if k > 0:
        loss_latent = masked_mse(lat_pred, latent_target(model, video, k), mask_idx)
        out["loss_latent"] = loss_latent
        loss = loss + cfg.latent_weight * loss_latent
    out["loss"] = loss
    return out
