"""Per-block convergence probes on a fixed probe batch.

Every ``probe.every`` steps the encoder runs on a fixed batch of unmasked clips; for each block
we keep the features of a fixed token subsample and log ``cka_prev`` (against the previous
probe), ``cka_init`` (against step 0), ``eff_rank`` and ``feat_std`` (collapse indicators).
``feat_std`` is the spread across examples of the per-token layer-normalised features (the form a
latent target takes): about 1 for a healthy block, near 0 when every input maps to the same
direction -- the naive-latent collapse, which centred measures such as ``eff_rank`` cannot see
because a pre-norm residual stream keeps a small input-dependent part beside the constant.
When training ends, ``cka_final`` compares every stored probe with the last one.

Storage bound: one probe keeps ``batch_size * tokens_per_clip`` rows of ``dim`` float16 values
per block, i.e. ``depth * batch_size * tokens_per_clip * dim * 2`` bytes (mae_tiny: 8 * 16 *
16 * 128 * 2 = 512 KiB per probe, 3.5 MiB for a 300-step run probed every 50 steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.cka import effective_rank, linear_cka
from core.config import ProbeConfig
from core.tracking import block_key


class ProbeRunner:
    def __init__(self, cfg: ProbeConfig, video: torch.Tensor, n_tokens: int, seed: int = 0) -> None:
        """``video (B, C, T, H, W)``: the fixed probe clips (held-out split, unmasked)."""
        self.cfg = cfg
        self.video = video
        g = torch.Generator().manual_seed(seed)
        k = min(cfg.tokens_per_clip, n_tokens)
        # Fixed token subsample per clip: (B, k) indices, the same at every probe.
        self.token_idx = torch.stack([torch.randperm(n_tokens, generator=g)[:k].sort().values
                                      for _ in range(video.shape[0])])
        self.steps: list[int] = []
        self.features: list[list[torch.Tensor]] = []   # per probe, per block: (B*k, dim) float16

    @torch.no_grad()
    def extract(self, model: nn.Module) -> list[torch.Tensor]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        _, outs = model.forward_encoder(self.video.to(device), None, return_blocks=True)
        model.train(was_training)
        idx = self.token_idx.to(device)
        feats = []
        for o in outs:
            sel = torch.gather(o.float(), 1, idx.unsqueeze(-1).expand(-1, -1, o.shape[-1]))
            feats.append(sel.reshape(-1, o.shape[-1]).to("cpu", torch.float16))
        return feats

    def probe(self, model: nn.Module, step: int) -> dict[str, float]:
        """Run the probe at ``step``; returns the per-block metrics keyed as in DESIGN.md."""
        feats = self.extract(model)
        out: dict[str, float] = {}
        prev = self.features[-1] if self.features else None
        init = self.features[0] if self.features else None
        for b, f in enumerate(feats):
            x = f.double()
            out[block_key("cka_prev", b)] = linear_cka(x, prev[b].double(), self.cfg.debiased) if prev else 1.0
            out[block_key("cka_init", b)] = linear_cka(x, init[b].double(), self.cfg.debiased) if init else 1.0
            out[block_key("eff_rank", b)] = effective_rank(x)
            out[block_key("feat_std", b)] = float(F.layer_norm(x, x.shape[-1:]).std(dim=0).mean())
        self.steps.append(step)
        self.features.append(feats)
        return out

    def final(self) -> dict[int, dict[str, float]]:
        """``cka_final`` for every stored probe step against the last probe: {step: {key: value}}."""
        if not self.features:
            return {}
        last = self.features[-1]
        return {s: {block_key("cka_final", b): linear_cka(f.double(), last[b].double(), self.cfg.debiased)
                    for b, f in enumerate(feats)}
                for s, feats in zip(self.steps, self.features)}

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "features": [list(f) for f in self.features]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = list(state["steps"])
        self.features = [list(f) for f in state["features"]]

    def save(self, path) -> None:
        torch.save({"steps": self.steps, "features": self.features, "token_idx": self.token_idx}, path)


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
