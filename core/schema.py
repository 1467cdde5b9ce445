"""What each logged indicator measures, and what would fool it: one line each.

The dashboard, the command lines and the README show these lines next to the numbers, so a
reader always knows what a figure means. Keys are the metric names without the
``/block_NN`` suffix (see :func:`core.tracking.block_key`).
"""

from __future__ import annotations

# Held-out pixel loss logged once at the end of a run: fixed val clips, fixed masks (the freeze
# test's and the comparisons' "final loss" when present).
HELDOUT_KEY = "val/loss_pixel"

METRIC_HELP: dict[str, str] = {
    "cka_prev": "debiased linear CKA of a block's content features (each position's mean over the probe clips "
                "removed) with the previous probe; fooled by a slowly drifting block whose every step is small",
    "cka_init": "debiased linear CKA of a block's content features with step 0 (how far it moved from init; "
                "0 = unrelated); fooled by large rotations of a few directions that CKA down-weights",
    "cka_final": "debiased linear CKA of a block's content features with the last probe (post-hoc: has it "
                 "reached its end state?); fooled by an LR schedule that stops every block at once",
    "grad_norm": "L2 norm of a block's gradient at a log step; fooled by the LR schedule and by loss scale, "
                 "not by what the block computes",
    "update_ratio": "||weight change|| / ||weights|| of one optimizer step; tracks the LR schedule as much "
                    "as convergence",
    "eff_rank": "entropy effective rank of content features (each position's mean over the probe clips "
                "removed); fooled by a few large noise directions",
    "feat_std": "spread across clips, at each fixed token position, of layer-normalised features, averaged over "
                "positions and dims (~0: position-only or collapsed); low also on mostly blank clips, so compare "
                "runs on the same data",
    "train/loss": "training loss (pixel + weighted latent) averaged over the log interval",
    "train/loss_pixel": "masked-patch pixel MSE with per-patch normalised targets",
    "train/loss_latent": "masked-token MSE to a block's layer-normalised output (layerlock, latent_scheduled, "
                         "latent_naive); near 0 can mean collapse, not success",
    "val/loss_pixel": "masked-patch pixel loss at the end of training on fixed held-out clips with fixed masks "
                      "(the same for every run of a dataset); fooled by nothing batch-related, only by a different "
                      "val split",
    "train/flops": "cumulative counted FLOPs of the training steps (FlopCounterMode, forward + backward)",
    "train/wall_s": "cumulative wall time of training steps (excludes checkpoint I/O)",
    "train/frozen_blocks": "length of the frozen prefix of encoder blocks (0 throughout for latent_scheduled, "
                           "which follows the schedule's target depth only)",
}


def metric_help(key: str) -> str:
    """The one-line description of a metric key (``cka_prev/block_03`` -> the ``cka_prev`` line)."""
    base = key.split("/block_")[0]
    return METRIC_HELP.get(base, "")
