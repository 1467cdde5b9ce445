"""The training loop: one function, :func:`train`, that runs (or resumes) one MLflow run.

Step convention: ``step`` counts optimizer updates already done. The loss logged at ``step`` is
computed with the weights after ``step`` updates; a probe at ``step`` sees those weights; a
schedule stage ``{"step": T, "frozen": k}`` applies from the update at step T on; checkpoint
``step_000100.pt`` holds the state after 100 updates, and resuming from it starts at step 100.
Data indices and masks of a step come from generators seeded by ``(seed, step)``, so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from core.config import ExperimentConfig, config_from_dict, flatten, group_name, to_yaml
from core.data import build_dataset, get_batch
from core.errors import LayerLockError, RunTerminated, TrainingDiverged
from core.flops import flop_model as build_flop_model
from core.freezing import FreezeSchedule, schedule_from_config, set_frozen_prefix
from core.masking import tube_mask
from core.model import VideoMAE, build_model
from core.objectives import compute_losses, freezes, heldout_pixel_loss
from core.probes import ProbeRunner, block_grad_norms, snapshot_blocks, update_ratios
from core.schema import HELDOUT_KEY
from core.tracking import Tracker

METHOD_TAG = {"pixel": "mae", "layerlock": "layerlock", "latent_naive": "latent_naive",
              "latent_scheduled": "latent_scheduled"}
# Steps whose gradients are not finite are skipped; this many in a row means the run has diverged.
MAX_SKIPPED_IN_A_ROW = 20


@dataclass
class TrainResult:
    run_id: str
    steps: int
    final_loss: float
    heldout_loss: float | None
    wall_s: float
    flops: float


# ----------------------------------------------------------------------------- helpers

def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """Generator for one step's data indices (salt 0) or masks (salt 1): a pure function of the step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4 + salt)


def lr_at(step: int, cfg: ExperimentConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr``."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: VideoMAE, cfg: ExperimentConfig) -> torch.optim.AdamW:
    """AdamW over *all* parameters (frozen ones simply get no grad), so (un)freezing never needs a rebuild."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "mask_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "mask_token" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr, betas=(0.9, 0.95))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise LayerLockError("train.device=cuda but no CUDA device is available")
    if name == "cuda" and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def init_distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)   # a crash leaves either the old file or the complete new one


def _load_newest_good(tracker: Tracker, names: list[str]) -> dict | None:
    """The newest of ``names`` that loads. A truncated or corrupt file (a kill during a write or a
    copy) falls back to the previous one, and stderr says which checkpoint was used."""
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(names, reverse=True):
            try:
                state = torch.load(tracker.download(name, tmp), map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or "model" not in state or "step" not in state:
                    raise ValueError("not a LayerLock checkpoint")
            except Exception as err:
                print(f"warning: checkpoint {name} of run {tracker.run_id} does not load "
                      f"({type(err).__name__}); trying the previous one", file=sys.stderr)
                failed.append(name)
                continue
            if failed:
                print(f"using checkpoint {name} of run {tracker.run_id} (newer ones do not load: "
                      f"{', '.join(failed)})", file=sys.stderr)
            return state
    return None


def _load_latest_checkpoint(tracker: Tracker) -> dict | None:
    """Newest checkpoint of the run that loads (falling back to older ones)."""
    return _load_newest_good(tracker, tracker.list_artifacts("checkpoints"))


@contextlib.contextmanager
def _sigterm_requests_stop():
    """While training, SIGTERM sets the yielded event instead of killing the process: the loop
    finishes its step, checkpoints, flushes and marks the run KILLED. Only the main thread can
    install a handler; elsewhere the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wrap(model: VideoMAE, device: torch.device, cfg: ExperimentConfig, world: int) -> torch.nn.Module:
    """The module the step runs: DDP when distributed, compiled when asked. Rebuilt on freeze changes,
    because DDP registers only parameters that require grad when it is built. Between two freeze
    changes the set of used parameters is fixed (the latent head is used iff a latent target
    exists, which only changes with the schedule stage; the trainer rebuilds on every stage
    change), hence ``static_graph``."""
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            static_graph=True)
    if cfg.train.compile:
        net = torch.compile(net)
    return net


# ----------------------------------------------------------------------------- train

def train(cfg: ExperimentConfig, *, tracking_uri: str | None = None, resume_run_id: str | None = None,
          tags: dict[str, str] | None = None, init_state: dict | None = None,
          progress: bool = True, stop_after: int | None = None, track: bool = True) -> TrainResult:
    """Run (or resume) one training run and log it to MLflow.

    ``init_state``: a checkpoint of another run to branch off (freeze tests), as a new run.
    ``stop_after``: leave the loop after this many steps (tests).
    ``track=False`` logs nothing (benchmarks measure tracking against it).
    Raises LayerLockError for bad input and TrainingDiverged on a NaN/inf loss (run FAILED).
    SIGTERM (main thread) ends the step, checkpoints, flushes, marks the run KILLED and raises
    RunTerminated.
    """
    rank, world = init_distributed()
    is_main = rank == 0
    tracker = Tracker(uri=tracking_uri, experiment=cfg.tracking.experiment, run_id=resume_run_id,
                      run_name=cfg.tracking.run_name, enabled=is_main and track,
                      tags={"layerlock.method": METHOD_TAG[cfg.objective.name],
                            "layerlock.dataset": cfg.data.name, "layerlock.group": group_name(cfg),
                            **(tags or {})})
    ckpt = None
    if resume_run_id is not None:
        if is_main:
            ckpt = _load_latest_checkpoint(tracker)
            if ckpt is None:
                raise LayerLockError(f"run {resume_run_id} has no checkpoint to resume from")
            cfg = config_from_dict(ckpt["config"], f"checkpoint of run {resume_run_id}")
            tracker.mark_running()   # only now: a resume that cannot load leaves the status alone
        if world > 1:
            holder = [ckpt]
            dist.broadcast_object_list(holder, src=0)
            ckpt = holder[0]
            cfg = config_from_dict(ckpt["config"], "checkpoint")
    try:
        with _sigterm_requests_stop() as stop:
            return _train(cfg, tracker, ckpt, rank, world, init_state, progress, stop_after, stop)
    except RunTerminated:
        raise   # already checkpointed and marked KILLED
    except TrainingDiverged as err:
        tracker.fail(str(err))
        raise
    except KeyboardInterrupt:
        tracker.fail("interrupted (KeyboardInterrupt)")
        raise
    except BaseException as err:
        tracker.fail(f"{type(err).__name__}: {err}")
        raise


def _train(cfg: ExperimentConfig, tracker: Tracker, ckpt: dict | None, rank: int, world: int,
           init_state: dict | None, progress: bool, stop_after: int | None,
           stop: threading.Event | None = None) -> TrainResult:
    t_cfg = cfg.train
    device = pick_device(t_cfg.device)
    torch.manual_seed(t_cfg.seed)
    if t_cfg.batch_size % world:
        raise LayerLockError(f"train.batch_size={t_cfg.batch_size} is not divisible by {world} processes")
    local_bs = t_cfg.batch_size // world

    dataset = build_dataset(cfg.data, "train")
    val = build_dataset(cfg.data, "val")
    probe_video, _ = get_batch(val, range(min(cfg.probe.batch_size, len(val))))
    model = build_model(cfg.model, cfg.geometry).to(device)
    optimizer = build_optimizer(model, cfg)
    schedule = schedule_from_config(cfg.freeze, cfg.model.depth, t_cfg.steps)
    probes = (ProbeRunner(cfg.probe, probe_video, cfg.geometry.n_tokens, seed=cfg.data.seed)
              if cfg.probe.enabled and rank == 0 else None)
    flops = build_flop_model(cfg)
    flops_per_k = {int(k): v for k, v in flops["per_step"].items()}

    # Resume (``ckpt``, this run's own checkpoint) or branch (``init_state``, another run's checkpoint):
    # both restore weights, optimizer, step and RNG; only a resume also restores this run's probe
    # history and logged layer rows.
    start = ckpt or init_state
    step, wall_s, flops_total, layer_rows = 0, 0.0, 0.0, []
    skipped, skipped_in_a_row = 0, 0   # steps whose gradients were not finite (no update made)
    if start is not None:
        model.load_state_dict(start["model"])
        step, wall_s, flops_total = int(start["step"]), float(start["wall_s"]), float(start["flops_total"])
        torch.set_rng_state(start["rng"])
    if ckpt is not None:
        layer_rows = [tuple(r) for r in ckpt["layer_rows"]]
        skipped = int(ckpt.get("skipped_steps", 0))
        if probes is not None and ckpt.get("probe"):
            probes.load_state_dict(ckpt["probe"])
    if start is not None:
        optimizer.load_state_dict(start["optimizer"])
    # Schedule stage k (its ``frozen`` count at this step): objectives that freeze freeze blocks
    # 0..k-1; latent_scheduled freezes nothing and uses k only for its latent target depth.
    stage = schedule.frozen_at(step) if schedule else 0
    frozen = stage if freezes(cfg.objective) else 0
    set_frozen_prefix(model, optimizer, frozen)   # after loading: drops the frozen blocks' moments
    if ckpt is None:
        tracker.log_params(flatten(cfg))
        tracker.log_text(to_yaml(cfg), "config.yaml")
        tracker.log_json(flops, "flop_model.json")
        if schedule is not None:
            tracker.log_json(schedule.to_dict(), "schedule.json")
        if getattr(dataset, "skipped_files", 0):
            tracker.log_metrics({"data/skipped_files": dataset.skipped_files}, 0)
    net = _wrap(model, device, cfg, world)

    run_dir = Path(tempfile.mkdtemp(prefix="layerlock-ckpt-"))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and t_cfg.amp
                else contextlib.nullcontext())

    def record(metrics: dict[str, float], at: int) -> None:
        tracker.log_metrics(metrics, at)
        for key, value in metrics.items():
            name, _, blk = key.partition("/block_")
            if blk:
                layer_rows.append((at, int(blk), name, float(value)))

    def checkpoint(next_step: int) -> None:
        if not tracker.enabled:
            return
        path = run_dir / f"step_{next_step:06d}.pt"
        _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": next_step,
                      "run_id": tracker.run_id, "rng": torch.get_rng_state(), "wall_s": wall_s,
                      "flops_total": flops_total, "config": cfg.model_dump(mode="json"),
                      "layer_rows": [list(r) for r in layer_rows], "skipped_steps": skipped,
                      "probe": probes.state_dict() if probes else {}}, path)
        tracker.flush()   # metrics up to this step are stored before the checkpoint is published
        tracker.log_artifact(path, "checkpoints")
        path.unlink()

    model.train()
    end = t_cfg.steps if stop_after is None else min(t_cfg.steps, step + stop_after)
    bar = tqdm(total=t_cfg.steps, initial=step, disable=not (progress and tracker.enabled),
               desc=f"{METHOD_TAG[cfg.objective.name]} {tracker.run_id[:8] if tracker.run_id else ''}",
               unit="step", dynamic_ncols=True)
    interval_loss: dict[str, list[float]] = {}
    t_interval, n_interval = time.perf_counter(), 0
    loss_value = float("nan")
    while step < end:
        if stop is not None and stop.is_set():
            break
        t0 = time.perf_counter()
        want = schedule.frozen_at(step) if schedule else 0
        if want != stage:
            stage = want
            if freezes(cfg.objective):
                frozen = stage
                set_frozen_prefix(model, optimizer, frozen)
            net = _wrap(model, device, cfg, world)
            tracker.log_metrics({"train/frozen_blocks": frozen}, step)
        if probes is not None and step % cfg.probe.every == 0 and step < t_cfg.steps:
            record(probes.probe(model, step), step)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        gen = step_generator(t_cfg.seed, step)
        idx = torch.randint(len(dataset), (t_cfg.batch_size,), generator=gen)[rank * local_bs:(rank + 1) * local_bs]
        video, _ = get_batch(dataset, idx.tolist())
        video = video.to(device, non_blocking=True)
        keep_idx, mask_idx = tube_mask(t_cfg.batch_size, cfg.geometry.grid, cfg.model.mask_ratio,
                                       step_generator(t_cfg.seed, step, salt=1))
        keep_idx = keep_idx[rank * local_bs:(rank + 1) * local_bs].to(device)
        mask_idx = mask_idx[rank * local_bs:(rank + 1) * local_bs].to(device)

        with autocast:
            losses = compute_losses(net, model, video, keep_idx, mask_idx, cfg.objective, stage=stage)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss is {float(loss.detach())} at step {step}")
        loss.backward()
        log_now = (step + 1) % t_cfg.log_every == 0 or step == 0 or step + 1 == t_cfg.steps
        extra: dict[str, float] = {}
        with_grad = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
        if not torch.isfinite(grad_norm):
            # A finite loss can still give inf/NaN gradients (an overflow inside one block). The
            # update would put NaN into the weights and every later checkpoint: skip it, count it.
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            skipped_in_a_row += 1
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise TrainingDiverged(f"gradients not finite for {skipped_in_a_row} steps in a row "
                                       f"(up to step {step})")
        else:
            skipped_in_a_row = 0
            if log_now:
                extra.update(block_grad_norms(model.blocks))
                before = snapshot_blocks(model.blocks)
            if t_cfg.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(with_grad, t_cfg.grad_clip, grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if log_now:
                extra.update(update_ratios(model.blocks, before))

        for key, value in losses.items():
            interval_loss.setdefault(key, []).append(float(value.detach()))
        loss_value = interval_loss["loss"][-1]
        flops_total += flops_per_k[stage]
        n_interval += 1
        wall_s += time.perf_counter() - t0
        if log_now:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t_interval
            metrics = {f"train/{k}": sum(v) / len(v) for k, v in interval_loss.items()}
            if world > 1:   # log the global-batch loss, not rank 0's shard
                keys = sorted(metrics)
                vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
                dist.all_reduce(vals)
                metrics = dict(zip(keys, (vals / world).tolist()))
            metrics.update({"train/lr": lr, "train/frozen_blocks": frozen,
                            "train/step_ms": 1000 * elapsed / n_interval,
                            "train/clips_per_s": n_interval * t_cfg.batch_size / elapsed,
                            "train/flops": flops_total, "train/wall_s": wall_s,
                            "train/skipped_steps": skipped})
            metrics.update(extra)
            record(metrics, step)
            tracker.submit()
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", frozen=frozen, refresh=False)
            interval_loss, n_interval, t_interval = {}, 0, time.perf_counter()
        step += 1
        bar.update(1)
        if step % t_cfg.checkpoint_every == 0 or step == t_cfg.steps:
            checkpoint(step)
            t_interval = time.perf_counter()   # checkpoint I/O is not step time
    bar.close()
    if stop is not None and stop.is_set() and step < end:
        if step % t_cfg.checkpoint_every or (start is None and step == 0):   # not just written by the loop
            checkpoint(step)
        tracker.finish("KILLED")
        raise RunTerminated(f"SIGTERM: run {tracker.run_id} checkpointed at step {step} and marked KILLED; "
                            f"continue it with --resume {tracker.run_id}")

    heldout = None
    if step >= t_cfg.steps and rank == 0 and t_cfg.heldout_clips > 0:
        clips, _ = get_batch(val, range(min(t_cfg.heldout_clips, len(val))))
        with autocast:
            heldout = heldout_pixel_loss(model, clips, cfg.model.mask_ratio, cfg.objective.norm_pix_loss)
        tracker.log_metrics({HELDOUT_KEY: heldout}, step)
    if step >= t_cfg.steps and probes is not None:
        record(probes.probe(model, step), step)
        for s, vals in probes.final().items():
            record(vals, s)
        if tracker.enabled:
            probes.save(run_dir / "features.pt")
            tracker.log_artifact(run_dir / "features.pt", "probe")
    if tracker.enabled and layer_rows:
        frame = pd.DataFrame(layer_rows, columns=["step", "block", "metric", "value"])
        frame = frame.drop_duplicates(["step", "block", "metric"], keep="last")
        frame.to_parquet(run_dir / "layer_metrics.parquet", index=False)
        tracker.log_artifact(run_dir / "layer_metrics.parquet")
    if step >= t_cfg.steps:
        tracker.finish()
    else:
        tracker.flush()
    return TrainResult(run_id=tracker.run_id or "", steps=step, final_loss=loss_value, heldout_loss=heldout,
                       wall_s=wall_s,
                       flops=flops_total)


def load_run_checkpoint(run_id: str, step: int | None = None, tracking_uri: str | None = None) -> dict:
    """A run's checkpoint (the latest, or the one after ``step`` updates), loaded with weights_only.
    When the latest does not load (truncated by a kill), the previous good one is used (said on stderr)."""
    tracker = Tracker(uri=tracking_uri, run_id=run_id, read_only=True)
    names = sorted(tracker.list_artifacts("checkpoints"))
    if not names:
        raise LayerLockError(f"run {run_id} has no checkpoints")
    if step is not None:
        wanted = f"checkpoints/step_{step:06d}.pt"
        if wanted not in names:
            have = ", ".join(n.split("_")[-1].removesuffix(".pt").lstrip("0") or "0" for n in names)
            raise LayerLockError(f"run {run_id} has no checkpoint at step {step} (has: {have})")
        names = [wanted]
    state = _load_newest_good(tracker, names)
    if state is None:
        which = f"its checkpoint at step {step}" if step is not None else "none of its checkpoints"
        raise LayerLockError(f"run {run_id}: {which} loads (truncated or corrupt files)")
    return state


__all__ = ["train", "TrainResult", "FreezeSchedule", "lr_at", "load_run_checkpoint"]
