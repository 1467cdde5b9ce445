"""Random tube masking as a pure function of a ``torch.Generator`` (outside the model).

Convention: token index = t * (h * w) + y * w + x, the flatten order of the Conv3d tubelet grid.
A *tube* is one spatial position across all time steps: tube masking hides the same spatial
positions in every frame, so the model cannot copy a patch from the neighbouring frame.
"""

from __future__ import annotations

import torch


def tube_mask(batch: int, grid: tuple[int, int, int], ratio: float,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample which tokens each clip keeps.

    Returns ``keep_idx (B, N_keep)`` and ``mask_idx (B, N_mask)``, int64, each row sorted,
    together a partition of ``range(t * h * w)``. Same generator state -> same masks.
    """
    t, h, w = grid
    hw = h * w
    n_keep = max(1, min(hw - 1, round(hw * (1.0 - ratio))))
    noise = torch.rand(batch, hw, generator=generator)
    order = noise.argsort(dim=1)
    keep_sp = order[:, :n_keep].sort(dim=1).values          # (B, n_keep) spatial positions
    mask_sp = order[:, n_keep:].sort(dim=1).values           # (B, hw - n_keep)
    offsets = torch.arange(t).mul(hw).view(1, t, 1)           # (1, t, 1)
    keep_idx = (offsets + keep_sp[:, None, :]).flatten(1)     # (B, t * n_keep), sorted
    mask_idx = (offsets + mask_sp[:, None, :]).flatten(1)
    return keep_idx, mask_idx


def apply_masks(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens: ``x (B, N, D)``, ``idx (B, K)`` -> ``(B, K, D)``."""
    return torch.gather(x, 1, idx.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
