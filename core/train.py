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
import copy
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from core import schema
from core.config import ExperimentConfig, config_from_dict, flatten, group_name, to_yaml
from core.data import build_dataset, get_batch
from core.errors import LayerLockError, RunTerminated, TrainingDiverged
from core.flops import count_step_flops
from core.flops import flop_model as build_flop_model
from core.freezing import (
    STEM_WITH_FIRST,
    FreezeSchedule,
    FrozenSet,
    fixed_set_from_config,
    prefix_set,
    schedule_from_config,
    set_frozen,
)
from core.masking import tube_mask
from core.model import VideoMAE, build_model
from core.monitor import LayerMonitor, ProbeSpec
from core.objectives import compute_losses, freezes, heldout_pixel_loss
from core.perf import Prefetcher, keep_freed_memory, spare_core
from core.probes import encoder_forward
from core.timemodel import StepTimer, calibrate, calibration_stages
from core.tracking import NullWriter, RunReader, Tracker, Writer, atomic_write

METHOD_TAG = {
    "pixel": "mae",
    "layerlock": "layerlock",
    "latent_naive": "latent_naive",
    "latent_scheduled": "latent_scheduled",
}
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
    loop_s: float = 0.0  # elapsed time of the training loop: steps, probes, log lines, checkpoints
    loop_cpu_s: float = 0.0  # CPU time of the process (all its threads) during the loop
    step_s: list[float] = field(default_factory=list)  # each loop iteration's wall time, in step order


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
    """AdamW over *all* parameters, so (un)freezing never needs a rebuild: frozen ones have no
    grad, and AdamW skips them before any arithmetic. Fused (one kernel over all parameters)
    on CPU and CUDA: much faster than the per-parameter loop."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "mask_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "mask_token" in n]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.train.lr,
        betas=(0.9, 0.95),
        fused=fused or None,
    )


_FLOP_MODELS: dict[str, dict] = {}  # per process: the count of each (model, objective, clip shape, batch size)


def _flop_model(cfg: ExperimentConfig, stem: str = STEM_WITH_FIRST, last_frozen: int | None = None) -> dict:
    """The run's FLOP model (``core.flops.flop_model``), counted once per process for each model,
    objective, clip shape, batch size and stem policy: counting traces every stage k and costs seconds of CPU,
    which each run of a grid or seed group (in one process, or in one pool worker) would pay again
    for the same numbers. Nothing else of the config enters the count, and counting leaves the RNG
    alone, so a run's results do not depend on whether its count was cached."""
    key = json.dumps(
        {
            "model": cfg.model.model_dump(mode="json"),
            "objective": cfg.objective.model_dump(mode="json"),
            "geometry": dataclasses.asdict(cfg.geometry),
            "batch_size": cfg.train.batch_size,
            "stem": stem,
            "last_frozen": last_frozen,
        },
        sort_keys=True,
    )
    if key not in _FLOP_MODELS:
        _FLOP_MODELS[key] = build_flop_model(cfg, stem=stem, last_frozen=last_frozen)
    return copy.deepcopy(_FLOP_MODELS[key])


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


def _load_checkpoint_file(path: Path | str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError("not a LayerLock checkpoint")
    return state


def _load_newest_good(reader: RunReader, names: list[str], local: dict[str, Path]) -> dict | None:
    """The newest of ``names`` that loads, from the run's local folder (``local``: the source of
    truth while the run lives; it may hold checkpoints not uploaded yet) or else from the store.
    A truncated or corrupt file (a kill during a copy) falls back to the previous checkpoint, and
    stderr says which one was used."""
    failed: list[str] = []
    stored = set(reader.list_artifacts(schema.CHECKPOINT_DIR))
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(names, reverse=True):
            sources = ([local[name]] if name in local else []) + ([name] if name in stored else [])
            for source in sources:
                try:
                    state = _load_checkpoint_file(source if isinstance(source, Path) else reader.download(source, tmp))
                    break
                except Exception as err:
                    error = err
            else:
                print(
                    f"warning: checkpoint {name} of run {reader.run_id} does not load "
                    f"({type(error).__name__ if sources else 'missing'}); trying the previous one",
                    file=sys.stderr,
                )
                failed.append(name)
                continue
            if failed:
                print(
                    f"using checkpoint {name} of run {reader.run_id} (newer ones do not load: {', '.join(failed)})",
                    file=sys.stderr,
                )
            return state
    return None


def _load_latest_checkpoint(reader: RunReader) -> dict | None:
    """Newest checkpoint of the run that loads (falling back to older ones)."""
    names, local = reader.checkpoints()
    return _load_newest_good(reader, names, local)


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
            model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True
        )
    if cfg.train.compile:
        net = torch.compile(net)
    return net


# ----------------------------------------------------------------------------- train


def train(
    cfg: ExperimentConfig,
    *,
    tracking_uri: str | None = None,
    resume_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    init_state: dict | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    track: bool = True,
) -> TrainResult:
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
    if resume_run_id is not None and not track:
        raise LayerLockError("resume_run_id needs track=True: a resumed run is logged")
    tracker: Writer = NullWriter()  # non-zero ranks, and runs that log nothing
    if is_main and track:
        tracker = Tracker(
            uri=tracking_uri,
            experiment=cfg.tracking.experiment,
            run_id=resume_run_id,
            run_name=cfg.tracking.run_name,
            tags={
                schema.TAG_METHOD: METHOD_TAG[cfg.objective.name],
                schema.TAG_DATASET: cfg.data.name,
                schema.TAG_GROUP: group_name(cfg),
                **({schema.TAG_WORLD_SIZE: str(world)} if world > 1 else {}),
                **(tags or {}),
            },
        )
    ckpt = None
    if resume_run_id is not None:
        if is_main:
            ckpt = _load_latest_checkpoint(tracker.reader())
            if ckpt is None:
                tracker.close()
                raise LayerLockError(f"run {resume_run_id} has no checkpoint to resume from")
            cfg = config_from_dict(ckpt["config"], f"checkpoint of run {resume_run_id}")
            tracker.mark_running()  # only now: a resume that cannot load leaves the status alone
        if world > 1:
            holder = [ckpt]
            dist.broadcast_object_list(holder, src=0)
            ckpt = holder[0]
            cfg = config_from_dict(ckpt["config"], "checkpoint")
    # The handler also covers the failure's bookkeeping: a SIGTERM then (torchrun's, once another rank
    # has died) must not kill the process before the run is marked FAILED with its reason.
    with _sigterm_requests_stop() as stop:
        try:
            return _train(cfg, tracker, ckpt, rank, world, init_state, progress, stop_after, stop)
        except RunTerminated:
            raise  # already checkpointed and marked KILLED
        except TrainingDiverged as err:
            tracker.fail(str(err))
            raise
        except KeyboardInterrupt:
            tracker.fail("interrupted (KeyboardInterrupt)")
            raise
        except BaseException as err:
            tracker.fail(f"{type(err).__name__}: {err}")
            raise


@dataclass
class _Progress:
    """What a run has done so far: restored from a checkpoint and saved in the next one."""

    step: int = 0  # optimizer updates done
    wall_s: float = 0.0  # cumulative step time, checkpoint I/O excluded
    cpu_s: float = 0.0  # cumulative CPU time of the process over the same steps
    flops_total: float = 0.0  # cumulative counted FLOPs
    skipped: int = 0  # steps whose gradients were not finite (no update made)
    skipped_in_a_row: int = 0
    loss: float = float("nan")  # the last step's loss


@dataclass
class _Interval:
    """Sums over the current log interval (reset after each log line and after checkpoint I/O)."""

    losses: dict[str, list[float]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    steps: int = 0


class _Run:
    """One run's training state and its named steps; :func:`_train` calls them in order."""

    def __init__(self, cfg: ExperimentConfig, tracker: Writer, rank: int, world: int) -> None:
        t_cfg = cfg.train
        self.cfg, self.tracker, self.rank, self.world = cfg, tracker, rank, world
        self.device = pick_device(t_cfg.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # activations reuse freed pages instead of faulting in new ones
        torch.manual_seed(t_cfg.seed)
        if t_cfg.batch_size % world:
            raise LayerLockError(f"train.batch_size={t_cfg.batch_size} is not divisible by {world} processes")
        self.local_bs = t_cfg.batch_size // world
        self.dataset = build_dataset(cfg.data, "train")
        self.val = build_dataset(cfg.data, "val")
        probe_video, _ = get_batch(self.val, range(min(cfg.probe.batch_size, len(self.val))))
        self.model = build_model(cfg.model, cfg.geometry).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = schedule_from_config(cfg.freeze, cfg.model.depth, t_cfg.steps)
        self.fixed = fixed_set_from_config(cfg.freeze, cfg.model.depth)  # freeze.only: (step, set) or None
        # Probes, gradient norms, update ratios and the per-block artifacts: the public API any
        # training loop uses (core.monitor), here on the encoder blocks and the unmasked encoder.
        # Where a core is free, each probe reads a copy of the weights in a background thread.
        background = self.device.type == "cpu" and spare_core("cpu", torch.get_num_threads())
        probe = None
        if cfg.probe.enabled and rank == 0:
            forward = encoder_forward if background else functools.partial(encoder_forward, self.model)
            probe = ProbeSpec(
                probe_video,
                forward,
                every=cfg.probe.every,
                tokens_per_clip=cfg.probe.tokens_per_clip,
                debiased=cfg.probe.debiased,
                seed=cfg.data.seed,
                n_positions=cfg.geometry.n_tokens,
                background=background,
            )
        # The trainer logs its params and train/* metrics and times its steps itself (loop_metrics).
        self.monitor = LayerMonitor(
            self.model.blocks,
            probe,
            model=self.model,
            writer=tracker,
            log_every=t_cfg.log_every,
            total_steps=t_cfg.steps,
            loop_metrics=False,
        )
        sched = self.schedule
        self.flops = _flop_model(
            cfg, stem=sched.stem if sched else STEM_WITH_FIRST, last_frozen=sched.last_frozen if sched else None
        )
        self.flops_per_k = {int(k): v for k, v in self.flops["per_step"].items()}
        self.fset = FrozenSet()  # what is frozen now (core.freezing.FrozenSet)
        self.fset_flops: dict[tuple[int, FrozenSet], float] = {}  # counted per (stage, set) off the schedule
        self.done = _Progress()
        self.interval = _Interval()
        # The run's local folder (core.tracking: checkpoints, probe features, the spool).
        self.run_dir = tracker.folder or Path(tempfile.mkdtemp(prefix="layerlock-run-"))
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda" and t_cfg.amp
            else contextlib.nullcontext()
        )
        self.stage = self.frozen = 0
        self.net: torch.nn.Module = self.model
        self.timer = StepTimer()  # time_model.json
        # The next step's batch, built while this one trains where a core is free for it.
        self.batches = Prefetcher(self._host_batch, spare_core(self.device.type, torch.get_num_threads()))
        self.loop_s = self.loop_cpu_s = 0.0
        self.step_s: list[float] = []  # each loop iteration: step, probe, log line, checkpoint

    def restore(self, ckpt: dict | None, init_state: dict | None) -> None:
        """Resume (``ckpt``, this run's own checkpoint) or branch (``init_state``, another run's):
        both restore weights, optimizer, step and RNG; only a resume also restores this run's
        probe history and logged layer rows. Then apply the schedule stage of the step reached."""
        start, done = ckpt or init_state, self.done
        if start is not None:
            self.model.load_state_dict(start["model"])
            done.step, done.wall_s = int(start["step"]), float(start["wall_s"])
            done.flops_total = float(start["flops_total"])
            done.cpu_s = float(start.get("cpu_s", 0.0))
            torch.set_rng_state(start["rng"])
        if ckpt is not None:
            reader = self.tracker.reader() if isinstance(self.tracker, Tracker) else None  # rank 0's
            self.monitor.load_state_dict({"layer_rows": ckpt["layer_rows"], "probe": ckpt.get("probe")}, reader)
            done.skipped = int(ckpt.get("skipped_steps", 0))
            self.timer.load_state_dict(ckpt.get("time_model") or {})
        if start is not None:
            self.optimizer.load_state_dict(start["optimizer"])
        # Schedule stage k (its ``frozen`` count at this step): objectives that freeze freeze blocks
        # 0..k-1; latent_scheduled freezes nothing and uses k only for its latent target depth.
        self.set_stage(*self.stage_at(done.step))  # after loading: drops frozen moments

    def log_header(self) -> None:
        """A new run's params, resolved config, FLOP model, schedule and skipped files."""
        cfg, tracker = self.cfg, self.tracker
        tracker.log_params(flatten(cfg))
        tracker.log_text(to_yaml(cfg), schema.CONFIG_ARTIFACT)
        tracker.log_json(self.flops, schema.FLOP_MODEL_ARTIFACT)
        if self.schedule is not None:
            tracker.log_json(self.schedule.to_dict(), schema.SCHEDULE_ARTIFACT)
        if getattr(self.dataset, "skipped_files", 0):
            tracker.log_metrics({schema.SKIPPED_FILES: self.dataset.skipped_files}, 0)

    def calibrate(self) -> None:
        """Time ``train.time_calibration`` steps at each stage this run will pass through
        (``core.timemodel.calibration_stages``), interleaved across stages, before the first step.

        The steps run on a copy of the model with an optimizer of its own, each on a batch of its
        own built the way training builds them (so data and masking cost what they cost in
        training), inside a forked RNG: the run's weights, optimizer state, RNG and counters are
        untouched, and none of it is training time. Skipped under torchrun and ``train.compile``
        (a copy would have to be wrapped and compiled again).
        """
        rounds = self.cfg.train.time_calibration
        if rounds <= 0 or self.world > 1 or self.cfg.train.compile:
            return
        ks = calibration_stages((f for _, f in self.schedule.stages) if self.schedule else (), self.cfg.model.depth)
        real = (self.model, self.optimizer, self.net, self.stage, self.frozen, self.fset)
        done = dataclasses.replace(self.done)
        batches = self.batches
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else None

        def set_stage(k: int) -> None:
            self.set_stage(k, self.set_for_stage(k))

        try:
            with torch.random.fork_rng(devices=devices):
                self.model = self.net = copy.deepcopy(real[0])
                self.optimizer = build_optimizer(self.model, self.cfg)
                self.batches = Prefetcher(self._host_batch, batches.background)
                # The batches of the steps ahead: pure functions of the step.
                calibrate(self.timer, ks, rounds, set_stage, lambda i: self.update(done.step + i, log_now=False), sync)
        finally:
            if self.batches is not batches:
                self.batches.close()
            (self.model, self.optimizer, self.net, self.stage, self.frozen, self.fset), self.done = real, done
            self.batches = batches
        self.log_time_model()

    def log_time_model(self) -> None:
        """``time_model.json``: the run's measured step times per stage (``core.timemodel``)."""
        if self.tracker.stores and (self.timer.training or self.timer.calibration):
            t_cfg = self.cfg.train
            self.tracker.log_json(
                self.timer.to_dict(
                    self.flops["per_step"],
                    n_blocks=self.cfg.model.depth,
                    batch_size=t_cfg.batch_size,
                    objective=self.cfg.objective.name,
                    device=self.device.type,
                    threads=torch.get_num_threads(),
                    calibration_steps=t_cfg.time_calibration,
                ),
                schema.TIME_MODEL_ARTIFACT,
            )

    def record(self, metrics: dict[str, float], at: int) -> None:
        """Log metrics at step ``at``; per-block ones also go to the rows of ``layer_metrics.parquet``."""
        self.monitor.record(metrics, at)

    def set_for_stage(self, k: int) -> FrozenSet:
        """What schedule stage k freezes: blocks 0..k-1 and the stem as the schedule's stem policy
        says, for objectives that freeze; nothing for latent_scheduled."""
        if not freezes(self.cfg.objective):
            return FrozenSet()
        sched = self.schedule
        return prefix_set(k, sched.stem, sched.last_frozen) if sched else prefix_set(k)

    def stage_at(self, step: int) -> tuple[int, FrozenSet]:
        """``(stage, frozen set)`` at ``step``: the schedule's, or ``freeze.only``'s fixed set from its
        step on (stage = its leading prefix, which only a latent target depth reads)."""
        if self.fixed is not None:
            start, fixed = self.fixed
            fs = fixed if step >= start and freezes(self.cfg.objective) else FrozenSet()
            return fs.prefix, fs
        k = self.schedule.frozen_at(step) if self.schedule else 0
        return k, self.set_for_stage(k)

    def set_stage(self, k: int, fs: FrozenSet) -> None:
        """Freeze ``fs`` (the one call that changes what is frozen) at stage ``k``."""
        self.stage, self.fset, self.frozen = k, fs, len(fs.blocks)
        set_frozen(self.model, self.optimizer, fs)

    def step_flops(self) -> float:
        """Counted FLOPs of one step as it runs now: the FLOP model's stage entry when the frozen set
        is the schedule's, else counted for the set (``freeze.only``), once."""
        if self.fset == self.set_for_stage(self.stage):
            return self.flops_per_k[self.stage]
        key = (self.stage, self.fset)
        if key not in self.fset_flops:
            self.fset_flops[key] = count_step_flops(self.cfg, self.cfg.train.batch_size, self.stage, self.fset)
        return self.fset_flops[key]

    def follow_schedule(self, step: int) -> None:
        """Apply a schedule stage that starts at ``step``: refreeze and rebuild the wrapped module."""
        want, fs = self.stage_at(step)
        if want == self.stage and fs == self.fset:
            return
        self.set_stage(want, fs)
        self.net = _wrap(self.model, self.device, self.cfg, self.world)
        self.tracker.log_metrics({schema.FROZEN_BLOCKS: self.frozen}, step)

    def shard(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's part of the global batch of ``step``: ``video (b, C, T, H, W)``, ``keep_idx``,
        ``mask_idx``, on the device. Built ahead where a core is free (:class:`core.perf.Prefetcher`)."""
        video, keep_idx, mask_idx = self.batches.get(step)
        return video.to(self.device, non_blocking=True), keep_idx.to(self.device), mask_idx.to(self.device)

    def _host_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``shard``'s batch on the host. Indices and masks are drawn for the global batch from
        ``(seed, step)``: a pure function of the step, whichever thread builds it."""
        t_cfg, lo, hi = self.cfg.train, self.rank * self.local_bs, (self.rank + 1) * self.local_bs
        gen = step_generator(t_cfg.seed, step)
        idx = torch.randint(len(self.dataset), (t_cfg.batch_size,), generator=gen)[lo:hi]
        video, _ = get_batch(self.dataset, idx.tolist())
        keep_idx, mask_idx = tube_mask(
            t_cfg.batch_size,
            self.cfg.geometry.grid,
            self.cfg.model.mask_ratio,
            step_generator(t_cfg.seed, step, salt=1),
        )
        return video, keep_idx[lo:hi], mask_idx[lo:hi]

    def update(self, step: int, log_now: bool = True) -> dict[str, torch.Tensor]:
        """Forward, backward and one optimizer update (skipped when gradients are not finite).
        Returns the losses; the monitor logs per-block gradient norms and update ratios at log
        steps (``log_now=False``: a timing step outside training, nothing logged)."""
        t_cfg, model, optimizer, done = self.cfg.train, self.model, self.optimizer, self.done
        video, keep_idx, mask_idx = self.shard(step)
        with self.autocast:
            losses = compute_losses(self.net, model, video, keep_idx, mask_idx, self.cfg.objective, stage=self.stage)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss is {float(loss.detach())} at step {step}")
        loss.backward()
        with_grad = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
        if not torch.isfinite(grad_norm):
            # A finite loss can still give inf/NaN gradients (an overflow inside one block). The
            # update would put NaN into the weights and every later checkpoint: skip it, count it.
            optimizer.zero_grad(set_to_none=True)
            done.skipped += 1
            done.skipped_in_a_row += 1
            if done.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise TrainingDiverged(
                    f"gradients not finite for {done.skipped_in_a_row} steps in a row (up to step {step})"
                )
            return losses
        done.skipped_in_a_row = 0
        if log_now:
            self.monitor.after_backward(step)
        if t_cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(with_grad, t_cfg.grad_clip, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log_now:
            self.monitor.after_step(step)
        return losses

    def log_interval(self, step: int, lr: float, bar: tqdm) -> None:
        """The log line of an interval: mean losses (over all ranks), speed and FLOPs."""
        done, iv, t_cfg = self.done, self.interval, self.cfg.train
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - iv.started
        metrics = {f"{schema.TRAIN}{k}": sum(v) / len(v) for k, v in iv.losses.items()}
        if self.world > 1:  # log the global-batch loss, not rank 0's shard
            keys = sorted(metrics)
            vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(vals)
            metrics = dict(zip(keys, (vals / self.world).tolist()))
        metrics.update(
            {
                schema.LR: lr,
                schema.FROZEN_BLOCKS: self.frozen,
                schema.STEP_MS: 1000 * elapsed / iv.steps,
                schema.CLIPS_PER_S: iv.steps * t_cfg.batch_size / elapsed,
                schema.FLOPS: done.flops_total,
                schema.WALL_S: done.wall_s,
                schema.CPU_S: done.cpu_s,
                schema.SKIPPED_STEPS: done.skipped,
            }
        )
        self.record(metrics, step)
        self.tracker.submit()
        bar.set_postfix(loss=f"{metrics[schema.LOSS]:.4f}", frozen=self.frozen, refresh=False)
        self.interval = _Interval()

    def step_once(self, bar: tqdm) -> None:
        """One training step: schedule, probe, learning rate, update, counters, log line, checkpoint."""
        cfg, t_cfg, done = self.cfg, self.cfg.train, self.done
        step, t0, c0 = done.step, time.perf_counter(), time.process_time()
        self.follow_schedule(step)
        # Probes are overhead in the time model, not step time.
        t_probe, c_probe = time.perf_counter(), time.process_time()
        self.monitor.probe_if_due(step)
        probe_s, probe_cpu = time.perf_counter() - t_probe, time.process_time() - c_probe
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = self.update(step)
        for key, value in losses.items():
            self.interval.losses.setdefault(key, []).append(float(value.detach()))
        done.loss = self.interval.losses["loss"][-1]
        done.flops_total += self.step_flops()
        self.interval.steps += 1
        step_s, step_cpu = time.perf_counter() - t0, time.process_time() - c0
        done.wall_s += step_s
        done.cpu_s += step_cpu
        self.timer.add(self.stage, step_s - probe_s, step_s, step_cpu - probe_cpu, step_cpu)
        if self.monitor.is_log_step(step):
            self.log_interval(step, lr, bar)
        done.step += 1
        bar.update(1)
        if done.step % t_cfg.checkpoint_every == 0 or done.step == t_cfg.steps:
            self.checkpoint(done.step)
            self.interval.started = time.perf_counter()  # checkpoint I/O is not step time

    def checkpoint(self, next_step: int) -> None:
        """Publish ``checkpoints/step_NNNNNN.pt`` in the run's local folder, atomically, and queue
        its upload; training does not wait for the store (core.tracking, "Write-ahead spool")."""
        if not self.tracker.stores:
            return
        done = self.done
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": next_step,
            "run_id": self.tracker.run_id,
            "rng": torch.get_rng_state(),
            "wall_s": done.wall_s,
            "cpu_s": done.cpu_s,
            "flops_total": done.flops_total,
            "config": self.cfg.model_dump(mode="json"),
            "skipped_steps": done.skipped,
            "time_model": self.timer.state_dict(),
            **self.monitor.state_dict(),
        }  # layer_rows, probe: a pending probe's included
        self.tracker.make_durable()  # the metrics up to this step are on disk before the checkpoint is
        path = self.run_dir / schema.checkpoint_artifact(next_step)
        atomic_write(path, lambda f: torch.save(state, f))
        self.tracker.log_artifact(path, schema.CHECKPOINT_DIR)

    def finish(self) -> TrainResult:
        """At the end of training: held-out loss, final probes and stored features, the layer
        metrics artifact, the run's status. A run stopped early (``stop_after``) is only flushed."""
        cfg, tracker, done, t_cfg = self.cfg, self.tracker, self.done, self.cfg.train
        step, ended = done.step, done.step >= t_cfg.steps
        heldout = None
        if ended and self.rank == 0 and t_cfg.heldout_clips > 0:
            clips, _ = get_batch(self.val, range(min(t_cfg.heldout_clips, len(self.val))))
            with self.autocast:
                heldout = heldout_pixel_loss(self.model, clips, cfg.model.mask_ratio, cfg.objective.norm_pix_loss)
            tracker.log_metrics({schema.HELDOUT_KEY: heldout}, step)
        # Final probe, cka_final, probe features, layer_metrics.parquet (the run stays open here).
        self.monitor.close(step, final_probe=ended)
        self.log_time_model()
        if ended:
            tracker.finish()
        else:  # stopped early (stop_after): everything sent, the run left to a later resume
            tracker.flush()
            tracker.close()
        return TrainResult(
            run_id=tracker.run_id or "",
            steps=step,
            final_loss=done.loss,
            heldout_loss=heldout,
            wall_s=done.wall_s,
            flops=done.flops_total,
            loop_s=self.loop_s,
            loop_cpu_s=self.loop_cpu_s,
            step_s=self.step_s,
        )


def _train(
    cfg: ExperimentConfig,
    tracker: Writer,
    ckpt: dict | None,
    rank: int,
    world: int,
    init_state: dict | None,
    progress: bool,
    stop_after: int | None,
    stop: threading.Event | None = None,
) -> TrainResult:
    """The loop as its named steps: set up, restore, log the header, step, finish (or stop on SIGTERM)."""
    run = _Run(cfg, tracker, rank, world)
    run.restore(ckpt, init_state)
    if ckpt is None:
        run.log_header()
        run.calibrate()
    run.net = _wrap(run.model, run.device, cfg, world)
    run.model.train()
    t_cfg, started_at = cfg.train, run.done.step
    end = t_cfg.steps if stop_after is None else min(t_cfg.steps, started_at + stop_after)
    bar = tqdm(
        total=t_cfg.steps,
        initial=started_at,
        disable=not (progress and tracker.stores),
        desc=f"{METHOD_TAG[cfg.objective.name]} {tracker.run_id[:8] if tracker.run_id else ''}",
        unit="step",
        dynamic_ncols=True,
    )
    run.interval = _Interval()
    loop_started, loop_cpu = time.perf_counter(), time.process_time()
    while run.done.step < end and not (stop is not None and stop.is_set()):
        t_step = time.perf_counter()
        run.step_once(bar)
        run.step_s.append(time.perf_counter() - t_step)
    run.loop_s, run.loop_cpu_s = time.perf_counter() - loop_started, time.process_time() - loop_cpu
    run.batches.close()
    bar.close()
    step = run.done.step
    if stop is not None and stop.is_set() and step < end:
        fresh = ckpt is None and init_state is None and step == 0
        if step % t_cfg.checkpoint_every or fresh:  # not just written by the loop
            run.checkpoint(step)
        run.log_time_model()
        tracker.finish("KILLED")
        raise RunTerminated(
            f"SIGTERM: run {tracker.run_id} checkpointed at step {step} and marked KILLED; "
            f"continue it with --resume {tracker.run_id}"
        )
    return run.finish()


def load_run_checkpoint(run_id: str, step: int | None = None, tracking_uri: str | None = None) -> dict:
    """A run's checkpoint (the latest, or the one after ``step`` updates), loaded with weights_only.
    When the latest does not load (truncated by a kill), the previous good one is used (said on stderr)."""
    reader = RunReader.open(run_id, tracking_uri)
    names, local = reader.checkpoints()
    if not names:
        raise LayerLockError(f"run {run_id} has no checkpoints")
    if step is not None:
        wanted = schema.checkpoint_artifact(step)
        if wanted not in names:
            have = ", ".join(str(schema.checkpoint_step(n)) for n in names)
            raise LayerLockError(f"run {run_id} has no checkpoint at step {step} (has: {have})")
        names = [wanted]
    state = _load_newest_good(reader, names, local)
    if state is None:
        which = f"its checkpoint at step {step}" if step is not None else "none of its checkpoints"
        raise LayerLockError(f"run {run_id}: {which} loads (truncated or corrupt files)")
    return state


__all__ = ["train", "TrainResult", "FreezeSchedule", "lr_at", "load_run_checkpoint"]
