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
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.config import ExperimentConfig
from core.freezing import set_frozen_prefix
from core.masking import n_keep
from core.model import build_model
from core.objectives import compute_losses, freezes


def count_step_flops(cfg: ExperimentConfig, batch_size: int, k: int) -> int:
    """FLOPs of one optimizer step's forward+backward for ``batch_size`` clips at schedule stage ``k``."""
    g = cfg.geometry
    with torch.device("meta"):
        model = build_model(cfg.model, g)
    set_frozen_prefix(model, None, k if freezes(cfg.objective) else 0)
    kept = n_keep(g.grid, cfg.model.mask_ratio)
    video = torch.empty(batch_size, g.channels, g.frames, g.size, g.size, device="meta")
    keep = torch.zeros(batch_size, kept, dtype=torch.long, device="meta")
    mask = torch.zeros(batch_size, g.n_tokens - kept, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        losses = compute_losses(model, model, video, keep, mask, cfg.objective, stage=k)
        losses["loss"].backward()
    return int(counter.get_total_flops())


def flop_model(cfg: ExperimentConfig, batch_size: int | None = None) -> dict:
    """The run's FLOP model: per-step FLOPs for every schedule stage k = 0..depth-1."""
    b = batch_size or cfg.train.batch_size
    per = {str(k): count_step_flops(cfg, b, k) for k in range(cfg.model.depth)}
    meaning = ("k = blocks 0..k-1 frozen" if freezes(cfg.objective)
               else "k = schedule stage (latent target = block k-1 output); nothing frozen")
    return {"n_blocks": cfg.model.depth, "batch_size": b, "objective": cfg.objective.name, "per_step": per,
            "per_step_k": meaning}
