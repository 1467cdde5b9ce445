"""Per-block convergence probes on a fixed probe batch, with the position signal controlled.

Every ``probe.every`` steps the encoder runs on a fixed batch of unmasked clips (``probe.batch_size``
clips of the held-out split). Every clip is read at the **same** token positions: all tokens when
the clip has at most ``probe.tokens_per_clip`` of them, else one fixed seeded subset. Features are
kept as ``(clips, positions, dim)``.

Why positions are controlled: every token carries the fixed sin-cos position table, and in
moving_digits most tubelets are black, so a large part of a block's raw variance is position
signal that never trains. Pooling tokens drawn at random positions lets CKA, effective rank and the
feature spread measure that fixed signal. Here each position's mean over the probe clips is
removed first (:func:`centre_positions`, the one place that centres), so what is measured is how
features vary with the *content* of a clip at a fixed place:

* ``cka_prev`` / ``cka_init`` / ``cka_final``: linear CKA (debiased unless ``probe.debiased`` is
  false) of the position-centred features (rows = clips x positions) against the previous
  probe, step 0, and the last probe;
* ``eff_rank``: entropy effective rank of the position-centred features, i.e. of the
  within-position covariance averaged over positions;
* ``feat_std``: spread across clips, at each fixed position, of the per-token layer-normalised
  features (the form a latent target takes), averaged over positions and dims. About 1 when
  every clip differs at every position; lower on mostly blank clips (mae_tiny on moving_digits
  reads 0.03-0.17), so compare runs on the same data; ~0 when features depend on position only
  (whatever the size of the position signal) or when every clip maps to the same direction --
  the naive-latent collapse.

See :func:`feature_stats`. When training ends, ``cka_final`` compares every stored probe with the
last one.

Storage: features are stored position-centred (centred in float64, then rounded), in bfloat16:
float32's exponent range, so no activation can overflow as float16 (max 65504) could, and the
rounding error (relative 2^-9) scales with the content, not with the position signal that was
removed. One probe keeps ``depth * batch_size * positions * dim * 2`` bytes. Defaults on mae_tiny
(8 blocks, dim 128, 64 tokens per clip): 32 clips x 32 positions = 1024 CKA rows per block,
8 * 32 * 32 * 128 * 2 B = 2 MiB per probe, 14 MiB for a 300-step run probed every 50 steps
(7 probes), each probe's features once in its own file ``probe/step_NNNNNN.pt`` (a checkpoint keeps
only the probe steps, so its size does not grow with the probes before it); the probe costs one
forward of 32 unmasked clips.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.cka import effective_rank, linear_cka
from core.config import ProbeConfig
from core.errors import LayerLockError
from core.schema import block_key

STORE_DTYPE = torch.bfloat16
# float32 rounding leaves ~1e-7 of a value behind when its mean is subtracted; spread across clips
# below this fraction of the features' size is indistinguishable from it.
_CONSTANT_RTOL = 1e-6


def probe_positions(n_tokens: int, tokens_per_clip: int, seed: int = 0) -> torch.Tensor:
    """The token positions every probe clip is read at: ``(P,)`` sorted indices.

    All tokens when ``n_tokens <= tokens_per_clip``; else a subset fixed by ``seed``. A seeded
    subset rather than an evenly strided one: a stride aliases with the (t, h, w) token grid
    (stride 2 on a 4 x 4 x 4 grid keeps two of the four columns only).
    """
    if n_tokens <= tokens_per_clip:
        return torch.arange(n_tokens)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_tokens, generator=g)[:tokens_per_clip].sort().values


def _check(x: torch.Tensor, name: str = "features") -> None:
    if x.ndim != 3:
        raise LayerLockError(f"{name} must have shape (clips, positions, dim), got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise LayerLockError(f"{name} need at least 2 clips to measure a spread across clips, got {x.shape[0]}")


def centre_positions(x: torch.Tensor) -> torch.Tensor:
    """Remove each position's mean over clips: ``(C, P, D)`` -> ``(C, P, D)`` float64.

    The one place where the position signal is removed; CKA, effective rank and the spread all
    read features through it. Features that do not vary across clips beyond float32 rounding
    (centred norm below ``_CONSTANT_RTOL`` of the raw norm) come back as exact zeros, so a
    position-only block reads as constant (CKA 0, effective rank 0), not as rounding noise.
    """
    _check(x)
    x = x.double()
    c = x - x.mean(dim=0, keepdim=True)
    if float(torch.linalg.vector_norm(c)) <= _CONSTANT_RTOL * float(torch.linalg.vector_norm(x)):
        return torch.zeros_like(c)
    return c


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Position-centred features as a CKA matrix: rows = clips x positions."""
    return centre_positions(x).flatten(0, 1)


def probe_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA of two ``(C, P, D)`` feature sets of the same clips and positions, position-centred."""
    if x.shape[:2] != y.shape[:2]:
        raise LayerLockError(f"probe features describe different clips/positions: {tuple(x.shape)} vs {tuple(y.shape)}")
    return linear_cka(_rows(x), _rows(y), debiased)


def feature_stats(x: torch.Tensor) -> dict[str, float]:
    """Collapse indicators of one block's probe features ``x (clips, positions, dim)``.

    Everything is measured across clips at each fixed position, then averaged over positions:

    * ``feat_std``: std over clips of the per-token layer-normalised features, averaged over
      positions and dims: ~1 when every clip differs at every position (lower on mostly blank
      clips), ~0 if features depend on position only or every clip maps to the same direction;
    * ``eff_rank``: entropy effective rank of the position-centred features (rows = clips x
      positions), i.e. of the within-position covariance averaged over positions; in
      ``[1, min(C*P - P, D)]``, 0.0 if nothing varies across clips;
    * ``position_share``: the fraction of the layer-normalised features' variance over all
      clips and positions that is explained by position alone (what a probe that pools random
      positions would mostly see when it is close to 1).
    """
    _check(x)
    normed = F.layer_norm(x.double(), x.shape[-1:])
    within = centre_positions(normed)
    feat_std = float(within.square().sum(dim=0).div(x.shape[0] - 1).sqrt().mean())
    total = float((normed - normed.mean(dim=(0, 1), keepdim=True)).square().sum())
    share = 1.0 - float(within.square().sum()) / total if total > 0 else 0.0
    return {"feat_std": feat_std, "eff_rank": effective_rank(_rows(x)), "position_share": max(share, 0.0)}


class ProbeRunner:
    def __init__(self, cfg: ProbeConfig, video: torch.Tensor, n_tokens: int, seed: int = 0) -> None:
        """``video (C, channels, T, H, W)``: the fixed probe clips (held-out split, unmasked)."""
        self.cfg = cfg
        self.video = video
        self.positions = probe_positions(n_tokens, cfg.tokens_per_clip, seed)   # (P,), the same for every clip
        self.steps: list[int] = []
        self.features: list[list[torch.Tensor]] = []   # per probe, per block: (C, P, dim) position-centred bf16

    @torch.no_grad()
    def extract(self, model: nn.Module) -> list[torch.Tensor]:
        """Every block's output at the probe positions: per block ``(C, P, dim)`` float32 on the CPU."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        _, outs = model.forward_encoder(self.video.to(device), None, return_blocks=True)
        model.train(was_training)
        pos = self.positions.to(device)
        return [o[:, pos].to("cpu", torch.float32) for o in outs]

    def probe(self, model: nn.Module, step: int) -> dict[str, float]:
        """Run the probe at ``step``; returns per-block metrics keyed like ``cka_prev/block_03``."""
        feats = self.extract(model)
        stored = [centre_positions(f).to(STORE_DTYPE) for f in feats]
        out: dict[str, float] = {}
        prev = self.features[-1] if self.features else None
        init = self.features[0] if self.features else None
        for b, (f, s) in enumerate(zip(feats, stored)):
            out[block_key("cka_prev", b)] = probe_cka(s, prev[b], self.cfg.debiased) if prev else 1.0
            out[block_key("cka_init", b)] = probe_cka(s, init[b], self.cfg.debiased) if init else 1.0
            stats = feature_stats(f)
            out[block_key("eff_rank", b)] = stats["eff_rank"]
            out[block_key("feat_std", b)] = stats["feat_std"]
        self.steps.append(step)
        self.features.append(stored)
        return out

    def final(self) -> dict[int, dict[str, float]]:
        """``cka_final`` for every stored probe step against the last probe: {step: {key: value}}."""
        if not self.features:
            return {}
        last = self.features[-1]
        return {s: {block_key("cka_final", b): probe_cka(f, last[b], self.cfg.debiased) for b, f in enumerate(feats)}
                for s, feats in zip(self.steps, self.features)}

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the probe steps and positions. Not the features: those of each
        probe are stored once, in their own file (:meth:`features_at`), so a checkpoint does not
        grow with every probe taken before it."""
        return {"steps": list(self.steps), "positions": self.positions.clone()}

    def load_state_dict(self, state: dict, features_of: Callable[[int], list[torch.Tensor]] | None = None) -> None:
        """Restore from :meth:`state_dict`; ``features_of(step)`` reads one probe's stored
        features (checkpoints written before features had their own files carry them inline)."""
        saved = state.get("positions")
        if saved is None or not torch.equal(saved, self.positions):
            # Older checkpoints kept random tokens per clip (flat rows): CKA against them is meaningless.
            raise LayerLockError("the checkpoint's probe features were taken at other token positions (an older "
                                 "probe format or another probe config); this run cannot resume, start a new one")
        self.steps = list(state["steps"])
        if "features" in state:
            self.features = [list(f) for f in state["features"]]
        elif features_of is not None:
            self.features = [list(features_of(s)) for s in self.steps]
        else:
            raise LayerLockError("the checkpoint's probe features are stored apart and no reader was given")

    def features_at(self, index: int = -1) -> dict:
        """One probe as a file's content: its step, positions and features (per block
        ``(clips, positions, dim)``, position-centred, bfloat16)."""
        return {"step": self.steps[index], "features": list(self.features[index]), "positions": self.positions,
                "layout": "per block: (clips, positions, dim), position-centred, bfloat16"}


def block_grad_norms(blocks: nn.ModuleList) -> dict[str, float]:
    """L2 norm of each trainable block's gradient (frozen blocks are skipped: they have none)."""
    out = {}
    for b, blk in enumerate(blocks):
        grads = [p.grad for p in blk.parameters() if p.grad is not None]
        if grads:
            out[block_key("grad_norm", b)] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
    return out


def snapshot_blocks(blocks: nn.ModuleList) -> list[list[torch.Tensor] | None]:
    """Copies of trainable blocks' parameters, to measure the next update's size."""
    return [[p.detach().clone() for p in blk.parameters()] if any(p.requires_grad for p in blk.parameters())
            else None for blk in blocks]


def update_ratios(blocks: nn.ModuleList, before: list[list[torch.Tensor] | None]) -> dict[str, float]:
    """||W_after - W_before|| / ||W_before|| per trainable block."""
    out = {}
    for b, (blk, old) in enumerate(zip(blocks, before)):
        if old is None:
            continue
        new = [p.detach() for p in blk.parameters()]
        delta = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(torch._foreach_sub(new, old))))
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(old)))
        out[block_key("update_ratio", b)] = float(delta / norm.clamp_min(1e-12))
    return out
