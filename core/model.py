"""Video ViT masked autoencoder (the model all three objectives share).

Named stages: ``patchify`` -> ``embed`` -> ``forward_encoder`` (visible tokens only) ->
``forward_decoder`` (mask tokens, light) -> pixel and latent predictions. Losses live in
``core.objectives``; masking in ``core.masking``; freezing in ``core.freezing``.

Public API used by probes, freezing and latent targets: ``model.blocks`` (the encoder blocks,
in depth order) and ``forward_encoder(..., return_blocks=True)``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from core.config import Geometry, ModelConfig
from core.errors import ConfigError
from core.masking import apply_masks

# ----------------------------------------------------------------------------- positions


def grid_coords(grid: tuple[int, int, int]) -> torch.Tensor:
    """(t*h*w, 3) float coordinates (t, y, x) in token order."""
    t, h, w = grid
    tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, yy, xx], dim=-1).reshape(-1, 3).float()


def sincos_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed 3D sin-cos position table (N, dim): a third of the channels per axis, padded with 0."""
    per_axis = (dim // 6) * 2  # even channel count per axis
    n_freq = per_axis // 2
    freqs = 1.0 / (10000 ** (torch.arange(n_freq).float() / max(n_freq, 1)))
    ang = grid_coords(grid)[:, :, None] * freqs  # (N, 3, n_freq)
    table = torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(1)  # (N, 3 * per_axis)
    return F.pad(table, (0, dim - table.shape[1]))


def rope_tables(coords: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3D rotary tables for coordinates ``(B, N, 3)`` -> cos, sin ``(B, 1, N, head_dim)``.

    Each axis rotates ``2 * n_freq`` channels in rotate-half layout; leftover channels are
    passed through (cos=1, sin=0).
    """
    n_freq = head_dim // 6
    if n_freq == 0:
        raise ConfigError(f"model.pos=rope needs a head dimension >= 6, got {head_dim}")
    freqs = 1.0 / (100 ** (torch.arange(n_freq, device=coords.device).float() / n_freq))
    ang = (coords[..., None] * freqs).flatten(-2)  # (B, N, 3 * n_freq)
    ang = torch.cat([ang, ang], dim=-1)  # rotate-half layout
    pad = head_dim - ang.shape[-1]
    cos = F.pad(ang.cos(), (0, pad), value=1.0).unsqueeze(1)
    sin = F.pad(ang.sin(), (0, pad), value=0.0).unsqueeze(1)
    return cos, sin


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate ``x (B, heads, N, head_dim)`` by the tables from :func:`rope_tables`."""
    cos, sin = rope
    n_rot = (x.shape[-1] // 6) * 6
    half = n_rot // 2
    x1, x2 = x[..., :half], x[..., half:n_rot]
    rotated = torch.cat([-x2, x1, torch.zeros_like(x[..., n_rot:])], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    def __init__(self, *, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, N, hd)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim=dim, heads=heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- model


class VideoMAE(nn.Module):
    def __init__(self, *, model: ModelConfig, geometry: Geometry) -> None:
        super().__init__()
        self.cfg, self.geometry = model, geometry
        g, d = geometry, model.dim
        self.patch_embed = nn.Conv3d(
            g.channels, d, kernel_size=(g.tubelet, g.patch, g.patch), stride=(g.tubelet, g.patch, g.patch)
        )
        self.use_rope = model.pos == "rope"
        self.register_buffer("coords", grid_coords(g.grid), persistent=False)
        self.register_buffer("pos_embed", sincos_3d(g.grid, d), persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim=d, heads=model.heads, mlp_ratio=model.mlp_ratio) for _ in range(model.depth)
        )
        self.norm = nn.LayerNorm(d)

        dd = model.decoder_dim
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos", sincos_3d(g.grid, dd), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dim=dd, heads=model.decoder_heads, mlp_ratio=model.mlp_ratio) for _ in range(model.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dd)
        self.pixel_head = nn.Linear(dd, g.patch_dim)  # patch-wise decoder: one tubelet per token
        self.latent_head = nn.Linear(dd, d)  # predicts an encoder block's output (latent targets)
        # Length of the frozen prefix of ``blocks``; written only by core.freezing.set_frozen_prefix.
        self.frozen_prefix = 0
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight  # as in MAE: init the conv like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)

    # -- stages ------------------------------------------------------------------------------
    def patchify(self, video: torch.Tensor) -> torch.Tensor:
        """``video (B, C, T, H, W)`` -> ``(B, N, tubelet*patch*patch*C)`` in token order.

        Two copies, channels last first: one 8-d permute whose innermost axis is the channel
        (stride T*H*W) gathers element by element, which is slow on CPU.
        """
        g = self.geometry
        t, h, w = g.grid
        b = video.shape[0]
        x = video.permute(0, 2, 3, 4, 1).contiguous()  # (B, T, H, W, C)
        x = x.reshape(b, t, g.tubelet, h, g.patch, w, g.patch, g.channels)
        return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, t * h * w, g.patch_dim)

    def embed(self, video: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """``video (B, C, T, H, W)`` -> tokens ``(B, N_keep, dim)`` (with sin-cos positions unless RoPE).

        ``video`` may also be given as its patches ``(B, N, patch_dim)`` (:meth:`patchify`), so a
        caller that needs them for pixel targets too patchifies once. A Conv3d whose stride equals
        its kernel is a linear map of each tubelet, so only the visible tubelets are embedded
        (``keep_idx``; None: all): masked ones cost nothing.
        """
        patches = video if video.dim() == 3 else self.patchify(video)  # (B, N, patch_dim)
        w = self.patch_embed.weight  # (dim, C, tubelet, p, p)
        weight = w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)  # patchify's (tubelet, p, p, C) order
        pos = self.pos_embed.expand(video.shape[0], -1, -1)
        if keep_idx is not None:
            patches, pos = apply_masks(patches, keep_idx), apply_masks(pos, keep_idx)
        x = F.linear(patches, weight.to(patches.dtype), self.patch_embed.bias)
        return x if self.use_rope else x + pos.to(x.dtype)

    def _rope(self, idx: torch.Tensor | None, batch: int, head_dim: int):
        if not self.use_rope:
            return None
        coords = self.coords.expand(batch, -1, -1)
        if idx is not None:
            coords = apply_masks(coords, idx)
        return rope_tables(coords, head_dim)

    def forward_encoder(
        self,
        video: torch.Tensor,
        keep_idx: torch.Tensor | None = None,
        *,
        return_blocks: bool = False,
        upto: int | None = None,
    ):
        """Encode visible tokens.

        ``video``: clips ``(B, C, T, H, W)`` or their patches (see :meth:`embed`).
        ``keep_idx (B, N_keep)`` selects visible tokens (None: the whole clip). The frozen prefix
        (``self.frozen_prefix`` blocks, with the patch embedding) runs under ``no_grad``: no
        autograd graph is built for it. ``upto=k`` stops after block k-1 and returns its raw
        output (used for latent targets). Returns ``latent (B, N_keep, dim)`` after the final
        norm, and with ``return_blocks`` also the list of every block's output.
        """
        b = video.shape[0]
        depth = len(self.blocks) if upto is None else upto
        frozen = min(self.frozen_prefix, depth)
        rope = self._rope(keep_idx, b, self.cfg.dim // self.cfg.heads)
        outs: list[torch.Tensor] = []
        # The frozen prefix (and the patch embedding with it) builds no autograd graph.
        with torch.no_grad() if frozen > 0 else contextlib.nullcontext():
            x = self.embed(video, keep_idx)
            for blk in self.blocks[:frozen]:
                x = blk(x, rope)
                outs.append(x)
        for blk in self.blocks[frozen:depth]:
            x = blk(x, rope)
            outs.append(x)
        if upto is not None:
            return (x, outs) if return_blocks else x
        x = self.norm(x)
        return (x, outs) if return_blocks else x

    def forward_decoder(
        self,
        latent: torch.Tensor,
        keep_idx: torch.Tensor,
        *,
        with_latent: bool = True,
        pred_idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``latent (B, N_keep, dim)`` -> pixel ``(B, N, patch_dim)`` and latent ``(B, N, dim)`` predictions.

        ``pred_idx (B, K)``: predict only at these tokens (``(B, K, ...)``; the losses read the
        masked ones), so the heads, their backward and the gathers run on K tokens, not N.
        ``with_latent=False`` skips the latent head (None): objectives without a latent target
        pay nothing for it.
        """
        b, n = latent.shape[0], self.geometry.n_tokens
        y = self.decoder_embed(latent)
        full = self.mask_token.to(y.dtype).expand(b, n, -1).clone()
        full.scatter_(1, keep_idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y)  # unshuffle
        if not self.use_rope:
            full = full + self.decoder_pos.to(full.dtype)
        rope = self._rope(None, b, self.cfg.decoder_dim // self.cfg.decoder_heads)
        for blk in self.decoder_blocks:
            full = blk(full, rope)
        if pred_idx is not None:
            full = apply_masks(full, pred_idx)  # per-token norm and heads: gather first
        full = self.decoder_norm(full)
        return self.pixel_head(full), self.latent_head(full) if with_latent else None

    def forward(
        self,
        video: torch.Tensor,
        keep_idx: torch.Tensor,
        *,
        with_latent: bool = True,
        pred_idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder then decoder; arguments as in :meth:`forward_encoder` and :meth:`forward_decoder`."""
        return self.forward_decoder(
            self.forward_encoder(video, keep_idx), keep_idx, with_latent=with_latent, pred_idx=pred_idx
        )


def build_model(model: ModelConfig, geometry: Geometry) -> VideoMAE:
    return VideoMAE(model=model, geometry=geometry)
