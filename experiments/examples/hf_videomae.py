"""LayerLock on Hugging Face's own ``VideoMAEForPreTraining``, trained by the HF ``Trainer``.

A tiny ``VideoMAEConfig`` (random weights, nothing downloaded) on the procedural moving-digits
clips (``core.data``), three steps as in the paper's recipe:

1. MAE: the model's own pixel loss, :class:`core.integrations.huggingface.LayerLockCallback`
   monitoring its encoder blocks (per-block metrics, ``layer_metrics.parquet``,
   ``flop_model.json``, ``time_model.json`` in an MLflow run);
2. a schedule derived from that run (``analysis.schedule.derive_run_schedule``, what
   ``layerlock schedule --run RUN_ID`` prints);
3. LayerLock with that schedule: the callback freezes through the ``Trainer``'s optimizer and
   :class:`~core.integrations.huggingface.LayerLockTrainer` adds the latent loss (the last frozen
   block's output on the unmasked clip) to HF's pixel loss::

    python -m experiments.examples.hf_videomae --steps 200 --out hf-run     # prints both run ids
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from core import schema
from core.config import DataConfig
from core.data import build_dataset
from core.errors import LayerLockError, first_line
from core.masking import tube_mask

EXPERIMENT = "hf-videomae"
FRAMES, SIZE, PATCH, TUBELET = 8, 32, 8, 2
GRID = (FRAMES // TUBELET, SIZE // PATCH, SIZE // PATCH)
MASK_RATIO = 0.75


def tiny_config(depth: int = 4, dim: int = 32):
    """A small ``VideoMAEConfig`` for 8-frame 32x32 clips (64 tokens). ``qkv_bias=False``: with
    transformers 5.18 a ``Trainer`` checkpoint of a VideoMAE with ``qkv_bias=True`` does not load
    its ``q_bias``/``v_bias`` back on resume (they are saved under those names and looked for as
    ``query.bias``/``value.bias``), so a resumed run would not be the run that never stopped."""
    from transformers import VideoMAEConfig

    return VideoMAEConfig(
        image_size=SIZE,
        patch_size=PATCH,
        num_channels=3,
        num_frames=FRAMES,
        tubelet_size=TUBELET,
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=2,
        intermediate_size=2 * dim,
        decoder_hidden_size=dim,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=2 * dim,
        norm_pix_loss=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=False,
    )


class MovingDigitsForHF(Dataset):
    """moving_digits clips as HF VideoMAE inputs: ``pixel_values (T, C, H, W)`` and a tube mask
    ``bool_masked_pos (N,)`` drawn from the clip's index (the same masks on every pass)."""

    def __init__(self, split: str, n: int, seed: int = 0) -> None:
        cfg = DataConfig(frames=FRAMES, size=SIZE, train_clips=max(8, n), val_clips=max(8, n), seed=seed)
        self.clips, self.n, self.seed = build_dataset(cfg, split), n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        video = self.clips[i]["video"]  # (C, T, H, W)
        _keep, mask = tube_mask(1, GRID, MASK_RATIO, torch.Generator().manual_seed(self.seed * 1_000_003 + i))
        bool_mask = torch.zeros(GRID[0] * GRID[1] * GRID[2], dtype=torch.bool)
        bool_mask[mask[0]] = True
        return {"pixel_values": video.permute(1, 0, 2, 3).contiguous(), "bool_masked_pos": bool_mask}


def batch_of(ds: Dataset, n: int) -> dict[str, torch.Tensor]:
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def train(
    out: Path,
    steps: int,
    *,
    schedule: dict | None = None,
    latent: bool = False,
    seed: int = 0,
    tracking_uri: str | None = None,
    every: int = 10,
    save_steps: int | None = None,
    resume: str | None = None,
    stop_at: int | None = None,
    depth: int = 4,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """One ``Trainer`` run with the callback; returns its run id, model, optimizer and callback.
    ``stop_at``: end training after that many steps (a run stopped early, to resume from its
    checkpoint); ``resume``: a checkpoint folder to resume from."""
    from transformers import TrainerCallback, TrainingArguments, VideoMAEForPreTraining, set_seed

    from core.integrations.huggingface import LayerLockCallback, LayerLockTrainer

    set_seed(seed)
    model = VideoMAEForPreTraining(tiny_config(depth))
    train_ds, probe_ds = MovingDigitsForHF("train", 256, seed), MovingDigitsForHF("val", 16, seed)
    probe = batch_of(probe_ds, 16)
    cb = LayerLockCallback(
        model,
        schedule,
        latent=latent,
        probe_batch=probe["pixel_values"],
        probe_forward=lambda pv: model.videomae(pv),
        every=every,
        log_every=5,
        flop_batch=batch_of(train_ds, 8),
        tracking_uri=tracking_uri,
        experiment=EXPERIMENT,
        tags={schema.TAG_DATASET: "moving_digits"},
    )
    callbacks = [cb, *(callbacks or [])]
    if stop_at is not None:

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= stop_at:
                    control.should_training_stop = True
                    control.should_save = True

        callbacks.append(Stop())
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        weight_decay=0.05,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_grad_norm=0.0,
    )
    trainer = LayerLockTrainer(model=model, args=args, train_dataset=train_ds, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return {"run_id": cb.run_id, "model": model, "optimizer": trainer.optimizer, "callback": cb}


def derive(run_id: str, tracking_uri: str | None, steps: int) -> dict:
    """The schedule ``layerlock schedule --run RUN_ID`` derives from the MAE run."""
    from analysis import io
    from analysis.schedule import derive_run_schedule, schedule_parts

    return derive_run_schedule(io.load_run(run_id, tracking_uri, schedule_parts()), total_steps=steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.examples.hf_videomae", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="hf-videomae-run", help="the Trainer's output folder")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        mae = train(Path(args.out) / "mae", args.steps, seed=args.seed, tracking_uri=args.tracking_uri)
        print(f"MAE run {mae['run_id']}", file=sys.stderr)
        schedule = derive(mae["run_id"], args.tracking_uri, args.steps)
        print(json.dumps({"stages": schedule["stages"]}), file=sys.stderr)
        if not schedule["stages"]:
            raise LayerLockError("no block converged in the MAE run: train it longer (--steps)")
        ll = train(
            Path(args.out) / "layerlock",
            args.steps,
            schedule=schedule,
            latent=True,
            seed=args.seed,
            tracking_uri=args.tracking_uri,
        )
    except LayerLockError as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    print(mae["run_id"])
    print(ll["run_id"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
