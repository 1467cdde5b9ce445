"""Captum attributions of a probe's prediction: per encoder block and over the input clip.

The one ``analysis`` module that imports torch; it holds only the captum part, the model,
checkpoint and probe work is core's. For a run's checkpoint (``analysis.io.load_checkpoint``) it

1. rebuilds the encoder with every weight fixed (:func:`frozen_encoder`: ``core.checkpoint``'s
   ``encoder_from_checkpoint``, then ``core.freezing.freeze_all``) and fits a small linear probe
   (``core.readout.fit_linear_probe``: mean-pooled final tokens -> LayerNorm -> Linear) on
   frozen features of a few training clips, for one classification task of the run's dataset;
2. explains the probe's predicted class on one validation clip:

   - per block: ``LayerConductance`` (or ``LayerIntegratedGradients``) over the output of
     ``model.blocks[i]``, attribution ``(1, N, D)`` per block, reduced to a signed total, an
     absolute total (and its share over blocks), and its distribution over token time slices;
   - input saliency: ``IntegratedGradients`` over the clip, ``|attribution|`` summed over
     colour channels, one map per frame.

Conventions: baselines are the all-black clip (the moving-digits background); the class
explained is the probe's prediction (not the true label, which is reported beside it).
Note that, by completeness, a block's attributions summed over all its neurons approximate the
same ``F(x) - F(baseline)`` for every block (both methods), so the signed totals are nearly
equal across blocks -- a check on the integral, not a finding; the absolute share (how much
attribution mass passes through each block's units) is the informative per-block number.
For the tiny configs (``n_steps`` 16-32) it is cheap enough to run on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.config import ExperimentConfig
from core.errors import LayerLockError
from core.readout import ProbedEncoder, checkpoint_tasks, fit_linear_probe

Method = Literal["conductance", "layer_ig"]
METHODS: dict[str, str] = {"conductance": "LayerConductance", "layer_ig": "LayerIntegratedGradients"}


@dataclass(frozen=True)
class Attribution:
    """Result of :func:`explain` (plain numpy/pandas, so it pickles for caching)."""

    run_id: str
    task: str
    clip: int
    method: str
    n_steps: int
    target: int  # class explained: the probe's prediction
    label: int  # the clip's true class
    probs: np.ndarray  # (n_classes,) probe probabilities on the clip
    probe_acc: float  # probe accuracy on held-out validation clips
    probe_chance: float  # 1 / n_classes
    blocks: pd.DataFrame  # block, total, abs_total, abs_share
    block_time: np.ndarray  # (n_blocks, t_tokens): share of each block's |attribution| per time slice
    frames: np.ndarray  # (T, H, W, 3) in [0, 1]
    saliency: np.ndarray  # (T, H, W) |IG| summed over channels
    saliency_delta: float  # IntegratedGradients convergence delta (small: the integral is accurate)


def frozen_encoder(checkpoint: dict) -> tuple[nn.Module, ExperimentConfig]:
    """The checkpoint's encoder (``core.checkpoint``) with every weight fixed
    (``core.freezing.freeze_all``), so attributions get input/activation gradients only."""
    from core.checkpoint import encoder_from_checkpoint as rebuild
    from core.freezing import freeze_all

    model, cfg, _ = rebuild(checkpoint)
    freeze_all(model)
    return model, cfg


def block_attributions(
    wrapper: ProbedEncoder, video: torch.Tensor, target: int, method: Method = "conductance", n_steps: int = 16
) -> tuple[pd.DataFrame, np.ndarray]:
    """Attribution of ``target`` to each block's output.

    Returns a frame (``block, total, abs_total, abs_share``) and ``(n_blocks, t_tokens)``: each
    block's |attribution| share per token time slice (tokens are in (t, h, w) order).
    """
    from captum.attr import LayerConductance, LayerIntegratedGradients

    if method not in METHODS:
        raise LayerLockError(f"unknown attribution method '{method}' (choose from {', '.join(METHODS)})")
    model = wrapper.model
    t_tokens = model.geometry.grid[0]
    baseline = torch.zeros_like(video)
    rows, per_time = [], []
    for i, block in enumerate(model.blocks):
        algo = LayerConductance(wrapper, block) if method == "conductance" else LayerIntegratedGradients(wrapper, block)
        attr = algo.attribute(video, baselines=baseline, target=target, n_steps=n_steps)
        attr = attr[0] if isinstance(attr, tuple) else attr  # (1, N, D)
        a = attr.detach().double()[0]
        rows.append({"block": i, "total": float(a.sum()), "abs_total": float(a.abs().sum())})
        by_time = a.abs().sum(-1).reshape(t_tokens, -1).sum(-1)
        per_time.append((by_time / by_time.sum().clamp_min(1e-30)).numpy())
    frame = pd.DataFrame(rows)
    total_abs = frame["abs_total"].sum()
    frame["abs_share"] = frame["abs_total"] / total_abs if total_abs > 0 else 0.0
    return frame, np.stack(per_time)


def input_saliency(
    wrapper: ProbedEncoder, video: torch.Tensor, target: int, n_steps: int = 16
) -> tuple[np.ndarray, float]:
    """IntegratedGradients over the clip: ``(T, H, W)`` |attribution| summed over channels, and
    the convergence delta."""
    from captum.attr import IntegratedGradients

    attr, delta = IntegratedGradients(wrapper).attribute(
        video, baselines=torch.zeros_like(video), target=target, n_steps=n_steps, return_convergence_delta=True
    )
    sal = attr.detach()[0].abs().sum(0)  # (T, H, W)
    return sal.numpy().astype(np.float32), float(delta.abs().max())


def explain(
    checkpoint: dict,
    task: str | None = None,
    clip: int = 0,
    method: Method = "conductance",
    n_steps: int = 16,
    n_probe_clips: int = 96,
    seed: int = 0,
    run_id: str = "",
) -> Attribution:
    """Fit a probe for ``task`` (default: the dataset's first classification task) and explain
    its prediction on validation clip ``clip``."""
    from core.data import build_dataset, get_batch

    if n_steps < 2:
        raise LayerLockError(f"n_steps must be at least 2, got {n_steps}")
    model, cfg = frozen_encoder(checkpoint)
    tasks, _ = checkpoint_tasks(checkpoint)
    if not tasks:
        raise LayerLockError(f"dataset {cfg.data.name} has no classification task to attribute")
    task = task or next(iter(tasks))
    probe, acc, n_classes = fit_linear_probe(model, cfg, task, n_train=n_probe_clips, seed=seed)
    wrapper = ProbedEncoder(model, probe).eval()
    val = build_dataset(cfg.data, "val")
    if not 0 <= clip < len(val):
        raise LayerLockError(f"clip {clip} out of range (the validation split has {len(val)} clips)")
    video, labels = get_batch(val, [clip])
    with torch.no_grad():
        probs = torch.softmax(wrapper(video), -1)[0]
    target = int(probs.argmax())
    blocks, block_time = block_attributions(wrapper, video, target, method, n_steps)
    saliency, delta = input_saliency(wrapper, video, target, n_steps)
    return Attribution(
        run_id=run_id,
        task=task,
        clip=int(clip),
        method=METHODS[method],
        n_steps=int(n_steps),
        target=target,
        label=int(labels[task][0]),
        probs=probs.numpy(),
        probe_acc=acc,
        probe_chance=1.0 / n_classes,
        blocks=blocks,
        block_time=block_time,
        frames=video[0].permute(1, 2, 3, 0).numpy().clip(0, 1),
        saliency=saliency,
        saliency_delta=delta,
    )
