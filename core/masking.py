"""Random tube masking as a pure function of a ``torch.Generator`` (outside the model).

Convention: token index = t * (h * w) + y * w + x, the flatten order of the Conv3d tubelet grid.
A *tube* is one spatial position across all time steps: tube masking hides the same spatial
positions in every frame, so the model cannot copy a patch from the neighbouring frame.
"""

from __future__ import annotations

import torch


def n_keep(grid: tuple[int, int, int], ratio: float) -> int:
    """Tokens each clip keeps under tube masking: ``t * kept spatial positions``, where at least
    one position is kept and at least one is masked."""
    t, h, w = grid
    return t * max(1, min(h * w - 1, round(h * w * (1.0 - ratio))))


def tube_mask(
    batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample which tokens each clip keeps.

    Returns ``keep_idx (B, N_keep)`` and ``mask_idx (B, N_mask)``, int64, each row sorted,
    together a partition of ``range(t * h * w)``. Same generator state -> same masks.
    """
    t, h, w = grid
    hw = h * w
    keep_sp_n = n_keep(grid, ratio) // t  # kept spatial positions per clip
    noise = torch.rand(batch, hw, generator=generator)
    order = noise.argsort(dim=1)
    keep_sp = order[:, :keep_sp_n].sort(dim=1).values  # (B, keep_sp_n) spatial positions
    mask_sp = order[:, keep_sp_n:].sort(dim=1).values  # (B, hw - keep_sp_n)
    offsets = torch.arange(t).mul(hw).view(1, t, 1)  # (1, t, 1)
    keep_idx = (offsets + keep_sp[:, None, :]).flatten(1)  # (B, t * n_keep), sorted
    mask_idx = (offsets + mask_sp[:, None, :]).flatten(1)
    return keep_idx, mask_idx


def apply_masks(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens: ``x (B, N, D)``, ``idx (B, K)`` -> ``(B, K, D)``."""
    return torch.gather(x, 1, idx.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
