"""LayerLock on a timm ViT trained by PyTorch Lightning (random weights, nothing downloaded).

A masked-image model on moving-digits frames (``core.data``): timm's ``VisionTransformer`` encodes
the frame with the masked patches replaced by a learned mask token (SimMIM-style: a timm ViT has
no token dropping), a linear head predicts the masked patches' pixels (the model's own loss) and
another their latents; :class:`core.integrations.lightning.LayerLockCallback` monitors the ViT's
``blocks``, freezes by the schedule through Lightning's optimizer and adds LayerLock's latent
loss (``add_latent``: the last frozen block's output on the unmasked frame)::

    python -m experiments.examples.lightning_timm --steps 100 --schedule schedule.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from core import schema
from core.config import DataConfig
from core.data import build_dataset
from core.errors import LayerLockError, first_line
from core.objectives import normalise_patches

SIZE, PATCH, MASK_RATIO = 32, 8, 0.75
N_PATCHES = (SIZE // PATCH) ** 2


class Frames(Dataset):
    """The first frame of each moving-digits clip ``(3, H, W)`` and a patch mask drawn from its index."""

    def __init__(self, split: str, n: int, seed: int = 0) -> None:
        self.clips = build_dataset(
            DataConfig(frames=2, size=SIZE, train_clips=max(8, n), val_clips=max(8, n), seed=seed), split
        )
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        order = torch.randperm(N_PATCHES, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i))
        return {"image": self.clips[i]["video"][:, 0], "mask_idx": order[: int(N_PATCHES * MASK_RATIO)].sort().values}


def patchify(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


class _NoLayerLock:
    """Stands in for the callback in a run without it (``train(callback=False)``, the bench's plain arm)."""

    def add_latent(self, loss: torch.Tensor, *_args: Any) -> torch.Tensor:
        return loss


def build_module(depth: int = 4, dim: int = 32):
    import lightning.pytorch as pl
    from timm.models.vision_transformer import VisionTransformer

    class MaskedViT(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.vit = VisionTransformer(
                img_size=SIZE,
                patch_size=PATCH,
                embed_dim=dim,
                depth=depth,
                num_heads=2,
                mlp_ratio=2.0,
                num_classes=0,
                drop_rate=0.0,
            )
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pixel_head = nn.Linear(dim, PATCH * PATCH * 3)
            self.latent_head = nn.Linear(dim, dim)
            self.layerlock = None  # the callback, set by train()

        def encode_masked(self, image: torch.Tensor, mask_idx: torch.Tensor) -> torch.Tensor:
            x = self.vit.patch_embed(image)
            keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device).scatter(1, mask_idx, False)
            x = torch.where(keep[..., None], x, self.mask_token.to(x.dtype))
            x = self.vit.blocks(self.vit._pos_embed(x))
            return self.vit.norm(x)[:, self.vit.num_prefix_tokens :]

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            image, mask_idx = batch["image"], batch["mask_idx"]
            feats = torch.gather(
                self.encode_masked(image, mask_idx), 1, mask_idx[..., None].expand(-1, -1, self.mask_token.shape[-1])
            )
            target = normalise_patches(
                torch.gather(patchify(image), 1, mask_idx[..., None].expand(-1, -1, PATCH * PATCH * 3))
            )
            loss = F.mse_loss(self.pixel_head(feats), target)
            # LayerLock: the target is block k-1's output on the unmasked image (its tokens after the class token).
            return self.layerlock.add_latent(
                loss,
                lambda: self.vit.forward_features(image),
                self.latent_head(feats),
                mask_idx + self.vit.num_prefix_tokens,
            )

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)

    return MaskedViT()


def train(
    out: Path,
    steps: int,
    *,
    schedule: dict | None = None,
    latent: bool = False,
    seed: int = 0,
    tracking_uri: str | None = None,
    every: int = 10,
    ckpt_path: str | None = None,
    save_every: int | None = None,
    stop_at: int | None = None,
    mlflow_logger: bool = True,
    callback: bool = True,
    extra_callbacks: list[Any] | None = None,
    log_every: int = 5,
) -> dict[str, Any]:
    """One Lightning run; returns the module, the trainer and the callback. ``save_every``:
    Lightning's own ``ModelCheckpoint`` saves ``out/checkpoints/step=N.ckpt`` every that many
    steps (during training, at the batch's end, as a real run does); ``stop_at``: stop after that
    many steps (a run interrupted, to resume from its checkpoint); ``ckpt_path``: resume from one.

    Resume at an epoch boundary (here 5 batches an epoch): a plain ``DataLoader`` is not
    resumable, so Lightning restarts it from its first batch. A checkpoint written by
    ``trainer.save_checkpoint`` after ``fit`` returned is not one to resume from either: its loop
    state says the epoch's last batch has run, and Lightning 2.6 replays batch 0 under batch index
    5 before starting the next epoch (the 1e-4 drift once seen here)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    from core.integrations.lightning import LayerLockCallback

    pl.seed_everything(seed, verbose=False)
    module = build_module()
    probe = torch.stack([Frames("val", 16, seed)[i]["image"] for i in range(16)])
    logger = (
        MLFlowLogger(experiment_name="lightning-timm", tracking_uri=tracking_uri or "sqlite:///mlflow.db")
        if mlflow_logger
        else False
    )
    vit = module.vit  # the stem freezes with block 0: the mask token too, it enters block 0 as the patches do
    cb = LayerLockCallback(
        schedule,
        latent=latent,
        probe_batch=probe,
        every=every,
        log_every=log_every,
        stem=[vit.patch_embed, vit.cls_token, vit.pos_embed, module.mask_token],
        probe_forward=lambda x: module.vit.forward_features(x),
    )
    module.layerlock = cb if callback else _NoLayerLock()
    callbacks: list[Any] = [cb] if callback else []
    callbacks += list(extra_callbacks or [])
    if save_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(out / schema.CHECKPOINT_DIR),
                filename="{step}",
                every_n_train_steps=save_every,
                save_top_k=-1,
            )
        )
    if stop_at is not None:

        class Stop(pl.Callback):
            def on_train_batch_end(self, trainer, *args: Any) -> None:
                if trainer.global_step >= stop_at:
                    trainer.should_stop = True

        callbacks.append(Stop())
    # shuffle=False: every epoch sees the clips in one order, so a resumed run sees what an unstopped one does
    loader = DataLoader(Frames("train", 40, seed), batch_size=8, shuffle=False, num_workers=0)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=bool(save_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=str(out),
        log_every_n_steps=5,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return {"module": module, "trainer": trainer, "callback": cb, "run_id": cb.run_id}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.examples.lightning_timm", description=__doc__.splitlines()[0]
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--schedule", help="schedule JSON (python -m analysis schedule); none: monitor only")
    p.add_argument("--out", default="lightning-timm-run")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)
    try:
        schedule = json.loads(Path(args.schedule).read_text()) if args.schedule else None
        result = train(
            Path(args.out), args.steps, schedule=schedule, latent=schedule is not None, tracking_uri=args.tracking_uri
        )
    except (LayerLockError, OSError, json.JSONDecodeError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    print(result["run_id"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
