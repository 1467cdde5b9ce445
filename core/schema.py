"""What each logged indicator measures, and what would fool it: one line each.

The dashboard, the command lines and the README show these lines next to the numbers, so a
reader always knows what a figure means. Keys are the metric names without the
``/block_NN`` suffix (see :func:`core.tracking.block_key`).
"""

from __future__ import annotations

METRIC_HELP: dict[str, str] = {
    "cka_prev": "linear CKA of a block's content features (position mean removed) with the previous probe; "
                "fooled by a slowly drifting block whose every step is small",
    "cka_init": "linear CKA of a block's content features with step 0 (how far it moved from init); "
                "fooled by large rotations of a few directions that CKA down-weights",
    "cka_final": "linear CKA of a block's content features with the last probe (post-hoc: has it reached its "
                 "end state?); fooled by an LR schedule that stops every block at once",
    "grad_norm": "L2 norm of a block's gradient at a log step; fooled by the LR schedule and by loss scale, "
                 "not by what the block computes",
    "update_ratio": "||weight change|| / ||weights|| of one optimizer step; tracks the LR schedule as much "
                    "as convergence",
    "eff_rank": "entropy effective rank of content features (position mean removed) across probe clips; "
                "fooled by a few large noise directions",
    "feat_std": "spread across clips, at each fixed token position, of layer-normalised features, averaged "
                "over positions (~1 healthy, ~0 collapsed); fooled by a constant plus a tiny input-dependent part",
    "train/loss": "training loss (pixel + weighted latent) averaged over the log interval",
    "train/loss_pixel": "masked-patch pixel MSE with per-patch normalised targets",
    "train/loss_latent": "masked-token MSE to a block's layer-normalised output (LayerLock or naive latent); "
                         "near 0 can mean collapse, not success",
    "train/flops": "cumulative counted FLOPs of the training steps (FlopCounterMode, forward + backward)",
    "train/wall_s": "cumulative wall time of training steps (excludes checkpoint I/O)",
    "train/frozen_blocks": "length of the frozen prefix of encoder blocks",
}


def metric_help(key: str) -> str:
    """The one-line description of a metric key (``cka_prev/block_03`` -> the ``cka_prev`` line)."""
    base = key.split("/block_")[0]
    return METRIC_HELP.get(base, "")
