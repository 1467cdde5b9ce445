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

The collapse check over seeds: MAE, LayerLock (each seed's schedule derived from its MAE run) and
the naive latent (the last block's output of the same trainable network as target from step 0,
no pixel loss, nothing frozen: the project's ``latent_naive``), the position-controlled
``feat_std`` of the last encoder block on the held-out probe clips (``core.probes.feature_stats``)
with a 95% t interval over seeds and the per-seed ratio to MAE::

    python -m experiments.examples.hf_videomae --seeds 0,1,2 --methods mae,layerlock,latent_naive
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
    naive: bool = False,
    callback: bool = True,
    calibration: int = 0,
    log_every: int = 5,
    dim: int = 32,
) -> dict[str, Any]:
    """One ``Trainer`` run with the callback; returns its run id, model, optimizer and callback.
    ``stop_at``: end training after that many steps (a run stopped early, to resume from its
    checkpoint); ``resume``: a checkpoint folder to resume from; ``naive``: the naive latent
    baseline (target: the last block of the trainable network from step 0, no pixel loss, no
    schedule)."""
    from transformers import TrainerCallback, TrainingArguments, VideoMAEForPreTraining, set_seed

    from core.integrations.huggingface import LayerLockCallback, LayerLockTrainer, VideoMAELatent

    set_seed(seed)
    model = VideoMAEForPreTraining(tiny_config(depth, dim))
    train_ds, probe_ds = MovingDigitsForHF("train", 256, seed), MovingDigitsForHF("val", 16, seed)
    probe = batch_of(probe_ds, 16)
    if naive and (schedule is not None or latent):
        raise LayerLockError("the naive latent baseline freezes nothing: no schedule, no LayerLock latent")
    cb = LayerLockCallback(
        model,
        schedule,
        latent=latent,
        latent_predictor=VideoMAELatent(model, target_block=-1) if naive else None,
        pixel_weight=0.0 if naive else 1.0,
        probe_batch=probe["pixel_values"],
        probe_forward=lambda pv: model.videomae(pv),
        every=every,
        log_every=log_every,
        flop_batch=batch_of(train_ds, 8),
        tracking_uri=tracking_uri,
        experiment=EXPERIMENT,
        tags={schema.TAG_DATASET: "moving_digits", **({schema.TAG_METHOD: "latent_naive"} if naive else {})},
        calibration=calibration,
    )
    callbacks = [cb, *(callbacks or [])] if callback else list(callbacks or [])
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
    return {
        "run_id": cb.run_id,
        "model": model,
        "optimizer": trainer.optimizer,
        "callback": cb,
        "probe": probe["pixel_values"],
    }


def last_block_feat_std(model: Any, pixel_values: torch.Tensor) -> float:
    """The position-controlled ``feat_std`` (:func:`core.probes.feature_stats`) of the last encoder
    block's output on the probe clips, every clip read at all its token positions."""
    from core.integrations import find_blocks
    from core.probes import clips_positions_dim, feature_stats

    blocks, out = find_blocks(model), {}
    handle = blocks[-1].register_forward_hook(lambda _m, _a, o: out.update(x=o[0] if isinstance(o, tuple) else o))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model.videomae(pixel_values)
    finally:
        handle.remove()
        model.train(was)
    return feature_stats(clips_positions_dim(out["x"]))["feat_std"]


METHODS = ("mae", "layerlock", "latent_naive")


def compare_feat_std(
    seeds: list[int], methods: list[str], steps: int, out: Path, tracking_uri: str | None = None, every: int = 10
) -> dict[str, Any]:
    """Train each method at each seed; ``{"feat_std": {method: [per seed]}, "rows": [...]}`` with,
    per method, the mean and 95% t interval over seeds and the mean per-seed ratio to MAE's."""
    from tqdm import tqdm

    from analysis.stats import t_interval

    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise LayerLockError(f"--methods {','.join(bad) or '(none)'}: choose from {', '.join(METHODS)}")
    if not seeds:
        raise LayerLockError("--seeds: give at least one seed, e.g. 0,1,2")
    values: dict[str, list[float]] = {m: [] for m in methods}
    need_mae = "mae" in methods or "layerlock" in methods
    bar = tqdm(total=len(seeds) * (len(methods) + (need_mae and "mae" not in methods)), desc="feat_std runs")
    for seed in seeds:
        mae = None
        if need_mae:
            mae = train(out / f"mae-{seed}", steps, seed=seed, tracking_uri=tracking_uri, every=every)
            bar.update()
            if "mae" in methods:
                values["mae"].append(last_block_feat_std(mae["model"], mae["probe"]))
        if "layerlock" in methods:
            schedule = derive(mae["run_id"], tracking_uri, steps)
            if not schedule["stages"]:
                raise LayerLockError(f"seed {seed}: no block converged in the MAE run: train it longer (--steps)")
            ll = train(
                out / f"layerlock-{seed}",
                steps,
                schedule=schedule,
                latent=True,
                seed=seed,
                tracking_uri=tracking_uri,
                every=every,
            )
            values["layerlock"].append(last_block_feat_std(ll["model"], ll["probe"]))
            bar.update()
        if "latent_naive" in methods:
            nv = train(out / f"naive-{seed}", steps, naive=True, seed=seed, tracking_uri=tracking_uri, every=every)
            values["latent_naive"].append(last_block_feat_std(nv["model"], nv["probe"]))
            bar.update()
    bar.close()
    rows = []
    for m in methods:
        v = values[m]
        row: dict[str, Any] = {"method": m, "n": len(v), "mean": sum(v) / len(v), "interval": t_interval(v)}
        if "mae" in values and m != "mae":
            ratios = [a / b for a, b in zip(v, values["mae"], strict=True)]
            row["ratio_to_mae"], row["ratio_interval"] = sum(ratios) / len(ratios), t_interval(ratios)
        rows.append(row)
    return {"feat_std": values, "rows": rows}


def format_feat_std(result: dict[str, Any]) -> str:
    def iv(x: tuple[float, float] | None) -> str:
        return "[one seed: no interval]" if x is None else f"[{x[0]:.4f}, {x[1]:.4f}]"

    lines = ["position-controlled feat_std, last encoder block, probe clips (95% t interval over seeds)"]
    for r in result["rows"]:
        line = f"  {r['method']:<13} n={r['n']}  mean {r['mean']:.4f} {iv(r['interval'])}"
        if "ratio_to_mae" in r:
            line += f"  ratio to mae {r['ratio_to_mae']:.3f} {iv(r['ratio_interval'])}"
        lines.append(line)
    seeds = "  per seed: " + "; ".join(
        f"{m} " + ", ".join(f"{x:.4f}" for x in v) for m, v in result["feat_std"].items()
    )
    return "\n".join([*lines, seeds])


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
    p.add_argument("--seeds", help="comma-separated seeds: train --methods at each, report feat_std (e.g. 0,1,2)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"with --seeds: some of {','.join(METHODS)}")
    args = p.parse_args(argv)
    try:
        if args.seeds is not None:
            try:
                seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
            except ValueError:
                raise LayerLockError(f"--seeds {args.seeds!r}: comma-separated integers, e.g. 0,1,2") from None
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            result = compare_feat_std(seeds, methods, args.steps, Path(args.out), args.tracking_uri)
            print(format_feat_std(result))
            return 0
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
