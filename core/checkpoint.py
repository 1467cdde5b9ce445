"""Rebuild a run's encoder from a training checkpoint: the one place that does it.

A checkpoint (``core.train.load_run_checkpoint``) is a dict with ``model`` (state dict),
``config`` (the resolved experiment config) and ``step``. Evaluation (``experiments/evaluate.py``)
and attribution (``analysis/attribution.py``) both start here.
"""

from __future__ import annotations

from core.config import ExperimentConfig, config_from_dict
from core.errors import LayerLockError
from core.model import VideoMAE, build_model


def encoder_from_checkpoint(checkpoint: dict, where: str = "checkpoint") -> tuple[VideoMAE, ExperimentConfig, int]:
    """``(model in eval mode with its weights, config, step)`` from a checkpoint dict.

    The model is on the CPU; ``step`` is the checkpoint's (``train.steps`` when it has none).
    Raises LayerLockError when the dict lacks ``model`` or ``config`` or the config is invalid.
    """
    if "model" not in checkpoint or "config" not in checkpoint:
        raise LayerLockError(f"{where} lacks 'model' or 'config'")
    cfg = config_from_dict(checkpoint["config"], f"{where} config")
    model = build_model(cfg.model, cfg.geometry)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, cfg, int(checkpoint.get("step", cfg.train.steps))


__all__ = ["encoder_from_checkpoint"]
