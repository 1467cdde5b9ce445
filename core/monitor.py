"""Per-block convergence probes for any PyTorch model in any training loop.

``LayerMonitor`` logs, to an MLflow run, what the trainer logs: ``cka_prev``, ``cka_init``,
``cka_final``, ``grad_norm``, ``update_ratio``, ``eff_rank``, ``feat_std`` per block
(``<metric>/block_NN``), the tidy ``layer_metrics.parquet``, the stored probe features
(``probe/``) and, given a training step to count, ``flop_model.json``. So ``python -m analysis
convergence|schedule`` and the dashboard read a run of your own loop like one of the trainer's;
:func:`core.freezing.apply_schedule` then applies a derived schedule in that loop::

    mon = LayerMonitor(blocks, probe_batch, forward, every=50, model=model)
    for step in range(steps):
        loss = loss_fn(model(x), y)
        loss.backward()
        mon.after_backward(step)     # probe (every ``every`` steps), gradient norms, weight snapshot
        optimizer.step()
        optimizer.zero_grad()
        mon.after_step(step, loss)   # update ratios, run-level metrics
    mon.close()                      # final probe, cka_final, artifacts

Step convention (as the trainer's, ``core/train.py``): ``step`` counts updates already done;
the probe at ``step`` sees the weights after ``step`` updates; the final probe in
:meth:`LayerMonitor.close` is at the number of steps seen. Gradient norms and update ratios are
taken at log steps: ``step == 0``, every ``log_every``-th step and the last one (when
``total_steps`` is known).

The monitor does not change training: hooks are attached only while the probe runs, the probe
runs in eval mode under ``no_grad`` with the RNG kept, and the FLOP count restores gradients,
buffers and the RNG (``core.flops.count_flop_model``). Weights with and without it are the same
bit for bit on CPU (tests/test_own_loop.py).

The trainer (``core/train.py``) runs its probes, gradient norms, update ratios and the
per-block artifacts through this class too.
"""

from __future__ import annotations

import copy
import functools
import gc
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from core import schema
from core.config import ProbeConfig
from core.errors import LayerLockError, first_line
from core.flops import count_flop_model, kept_as_is
from core.freezing import apply_schedule, freeze_prefix, frozen_prefix_length  # noqa: F401  (one import for users)
from core.probes import ProbeRunner, ProbeTarget, block_grad_norms, snapshot_blocks, update_ratios
from core.timemodel import StepTimer, calibrate
from core.tracking import Tracker

DEFAULT_EXPERIMENT = "layerlock"


def _open_tracker(run: Any, tracking_uri: str | None, experiment: str, run_name: str | None,
                  tags: dict[str, str]) -> tuple[Tracker, bool]:
    """The tracker to log through and whether this monitor started (and so ends) its run.

    ``run``: a :class:`core.tracking.Tracker` (the trainer's), an MLflow run id, an MLflow run
    object (``mlflow.start_run()``), ``False`` (log nothing) or None: the active fluent run if
    there is one, else a new run."""
    if run is False:
        return Tracker(enabled=False), False
    if isinstance(run, Tracker):
        return run, False
    if run is None:
        import mlflow

        active = mlflow.active_run()
        if active is None:
            return Tracker(uri=tracking_uri, experiment=experiment, run_name=run_name, tags=tags), True
        run, tracking_uri = active, tracking_uri or mlflow.get_tracking_uri()
    run_id = run if isinstance(run, str) else getattr(getattr(run, "info", None), "run_id", None)
    if not run_id:
        raise LayerLockError(f"run must be an MLflow run id, an MLflow run, a Tracker, False or None; "
                             f"got {type(run).__name__}")
    tracker = Tracker(uri=tracking_uri, run_id=run_id)
    tracker.set_tags(tags)
    return tracker, False


class LayerMonitor:
    """Convergence probes on a list of modules (the blocks, in depth order) of any model.

    ``blocks``: the modules whose outputs are probed and whose parameters make up each block.
    ``probe_batch``: a fixed batch (held-out inputs), passed to ``forward(probe_batch)``, which
    runs the model on it (its return value is ignored; block outputs are read by hooks and
    turned into ``(clips, positions, dim)`` by :func:`core.probes.clips_positions_dim`, or by
    ``features``).
    ``every``: probe interval in steps (None: no probes, gradient metrics only).
    ``model``: the whole model. The probe runs it in eval mode (else only the blocks), and it is
    needed to count FLOPs.
    ``train_step``: a function that runs the forward and loss on one fixed training batch and
    returns the loss; with it the FLOP model is counted for every frozen-prefix length and
    logged as ``flop_model.json`` (``core.flops.count_flop_model``). Without it, ``python -m
    analysis schedule`` predicts savings from an estimate (uniform per-block cost).
    ``stem``: modules or parameters before block 0 that freeze with it (as in
    :func:`core.freezing.freeze_prefix`), for the FLOP count and the calibration.
    ``optimizer``: the loop's optimizer. With it (and ``train_step``) the calibration steps
    include an optimizer update, by an optimizer of the same class and settings over the same
    parameters: the loop's own optimizer is not touched.
    ``calibration``: with ``train_step``, time this many steps (forward, backward and, with
    ``optimizer``, an update) at each frozen-prefix length before training, interleaved
    (:func:`core.timemodel.calibrate`), on the model itself, whose weights, gradients, buffers,
    frozen prefix and RNG are then put back bit for bit. With the training steps' own times
    (per frozen-prefix length, the monitor's time excluded) they make up ``time_model.json``,
    from which ``python -m analysis schedule`` predicts a schedule's wall-time saving. 0: none.
    ``run``: an MLflow run id, an ``mlflow.start_run()`` run, a ``core.tracking.Tracker``,
    ``False`` (log nothing) or None (the active run, else a new one in ``experiment`` at
    ``tracking_uri``). A run the monitor started is ended by :meth:`close`.
    ``total_steps``: logged as ``train.steps`` (else the number of steps seen, at close).
    ``background``: each probe reads a copy of ``model``'s weights in a background thread while
    training goes on (worth it where a CPU core is idle, or on a GPU); the numbers are those of
    a probe in the loop. Needs ``model=`` (the blocks must be its submodules), and ``forward``
    then takes the model to run as well: ``forward(model, probe_batch)``. Its results are logged
    when ready, at the latest by the next probe, :meth:`wait` or :meth:`close`; the forward must
    draw no random numbers in eval mode (the RNG is not forked in the background thread).

    The blocks' parameters are listed once, here (the gradient norms and update ratios read
    those lists): attach the monitor after anything that replaces a model's parameter objects
    (FSDP's flattening, say; ``.to(device)`` keeps them).
    """

    def __init__(self, blocks: Sequence[nn.Module], probe_batch: Any, forward: Callable[[Any], Any], *,
                 every: int | None = 50, log_every: int = 10, total_steps: int | None = None,
                 model: nn.Module | None = None, train_step: Callable[[], torch.Tensor] | None = None,
                 stem: Iterable[nn.Module | nn.Parameter] = (),
                 run: Any = None, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 run_name: str | None = None, tags: dict[str, str] | None = None,
                 params: dict[str, Any] | None = None,
                 tokens_per_clip: int = 32, debiased: bool = True, seed: int = 0,
                 features: Callable[[Any], torch.Tensor] | None = None, n_positions: int | None = None,
                 run_metrics: bool = True, describe_run: bool = True, background: bool = False,
                 optimizer: torch.optim.Optimizer | None = None, calibration: int = 5) -> None:
        self.blocks = list(blocks)
        if not self.blocks or not all(isinstance(b, nn.Module) for b in self.blocks):
            raise LayerLockError("blocks must be a non-empty list of torch.nn.Module, in depth order")
        self._block_params = [list(b.parameters()) for b in self.blocks]   # read once: see the class docstring
        for name, value, least in (("every", every, 1), ("log_every", log_every, 1),
                                   ("tokens_per_clip", tokens_per_clip, 1), ("total_steps", total_steps, 1),
                                   ("calibration", calibration, 0)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise LayerLockError(f"{name} must be an integer >= {least}, got {value!r}")
        if train_step is not None and model is None:
            raise LayerLockError("train_step needs model=: counting FLOPs runs real steps and puts the model's "
                                 "gradients and buffers back afterwards")
        self.model, self.stem = model, list(stem)
        self._forward, self._pool, self._block_names = forward, None, []
        if background and every is not None:
            names = {id(m): name for name, m in (model.named_modules() if model is not None else ())}
            if model is None or any(id(b) not in names for b in self.blocks):
                raise LayerLockError("background=True needs model= with the blocks among its submodules: "
                                     "the probe reads a copy of the model's weights")
            self._block_names = [names[id(b)] for b in self.blocks]
            forward = functools.partial(forward, model)   # the loop's own probes (the final one)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerlock-probe")
        self._shadow: ProbeTarget | None = None   # the copy a background probe reads
        # Each probe's features file is written (fsynced) by a thread of its own, off the loop.
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []
        self._pending: tuple[int, Future[dict[str, float]]] | None = None
        self._last_probe: int | None = None
        self.every, self.log_every, self.total_steps = every, log_every, total_steps
        self.run_metrics = run_metrics
        self.probes: ProbeRunner | None = None
        if every is not None:
            cfg = ProbeConfig(every=every, batch_size=max(4, _batch_len(probe_batch)),
                              tokens_per_clip=tokens_per_clip, debiased=debiased)
            self.probes = ProbeRunner(cfg, probe_batch, n_positions, seed, blocks=self.blocks, forward=forward,
                                      owner=model, features=features)
        self.flop_model = (count_flop_model(self.blocks, train_step, model=model, stem=self.stem)
                           if train_step is not None else None)
        # time_model.json: calibration now, then every training step at its frozen-prefix length.
        self._timer = StepTimer()
        self.calibration = calibration if train_step is not None and run_metrics else 0
        self._calibrated = ""
        if self.calibration:
            self._calibrate(train_step, optimizer)
        all_tags = {schema.TAG_METHOD: schema.METHOD_OWN_LOOP, **(tags or {})} if describe_run else {}
        self.tracker, self._owns_run = _open_tracker(run, tracking_uri, experiment, run_name, all_tags)
        self.layer_rows: list[tuple[int, int, str, float]] = []   # (step, block, metric, value)
        self._snapshot: list[list[torch.Tensor] | None] | None = None
        self._losses: list[torch.Tensor] = []
        self._interval_s = 0.0
        self._interval_steps = 0
        self._in_calls = (0.0, 0.0)   # wall and CPU seconds inside the monitor since the last step ended
        # Per step since the last log step: (end time, CPU time, in-call times, frozen prefix, loss).
        self._steps: list[tuple[float, float, tuple[float, float], int, Any]] = []
        self.wall_s = 0.0
        self.flops_total = 0.0
        self.last_step: int | None = None
        self._closed = False
        self._steps_logged = not describe_run or total_steps is not None or "train.steps" in (params or {})
        if describe_run:
            self.tracker.log_params(self._params(params, probe_batch, tokens_per_clip, debiased))
        if self.flop_model is not None:
            self.tracker.log_json(self.flop_model, schema.FLOP_MODEL_ARTIFACT)
        self.log_time_model()
        # A full garbage collection now, a one-off cost of attaching: importing MLflow (and what it
        # pulls in) leaves hundreds of thousands of new objects, and the first full collection that
        # walks them (0.4-0.5 s on a 2-core CPU) would otherwise fall in a training step, typically
        # the first probe's. After it, the next full collection waits for a quarter as many again.
        gc.collect()
        self._tick, self._cpu_tick = time.perf_counter(), time.process_time()

    @property
    def timer(self) -> StepTimer:
        """The step times so far (``time_model.json``'s record), every step seen filed."""
        self._settle()
        return self._timer

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def _params(self, extra: dict[str, Any] | None, batch: Any, tokens_per_clip: int, debiased: bool) -> dict:
        out: dict[str, Any] = {"model.depth": len(self.blocks), "train.log_every": self.log_every,
                               "monitor.blocks": ", ".join(type(b).__name__ for b in self.blocks)}
        if self.total_steps is not None:
            out["train.steps"] = self.total_steps
        if self.probes is not None:
            out.update({"probe.every": self.every, "probe.batch_size": _batch_len(batch),
                        "probe.tokens_per_clip": tokens_per_clip, "probe.debiased": debiased})
        if self.model is not None:
            out["monitor.parameters"] = sum(p.numel() for p in self.model.parameters())
        return {**out, **(extra or {})}

    def _calibrate(self, train_step: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer | None) -> None:
        """Time ``self.calibration`` steps at each calibrated frozen-prefix length (see the class
        docstring); everything the steps change is put back."""
        n = len(self.blocks)
        stages = sorted({round(i * (n - 1) / 7) for i in range(8)}) if n > 8 else list(range(n))
        shadow = _optimizer_like(optimizer) if optimizer is not None else None
        cuda = next((p.device for p in self.model.parameters() if p.device.type == "cuda"), None)
        params = list(self.model.parameters())

        def step(_i: int) -> None:
            loss = train_step()
            loss.backward()
            if shadow is not None:
                shadow.step()
            for p in params:
                p.grad = None

        with kept_as_is(self.model, self.blocks, self.stem, weights=True):
            calibrate(self._timer, stages, self.calibration,
                      lambda k: freeze_prefix(self.blocks, k, shadow, stem=self.stem), step,
                      (lambda: torch.cuda.synchronize(cuda)) if cuda is not None else None)
        self._calibrated = ("forward, loss, backward" + (f" and {type(optimizer).__name__} update"
                                                         if shadow is not None else "")
                            + " on the fixed batch of train_step")

    def log_time_model(self) -> None:
        """``time_model.json`` (``core.timemodel``): the calibration and the training steps so far."""
        if not self.run_metrics or not self.tracker.enabled or not (self.timer.training or self.timer.calibration):
            return
        device = next((p.device.type for p in self.model.parameters()), "cpu") if self.model is not None else "cpu"
        meta = {"n_blocks": len(self.blocks), "device": device, "threads": torch.get_num_threads(),
                "calibration_steps": self.calibration, "calibration_step": self._calibrated or None,
                "excluded": "time inside the monitor's calls (probes, gradient metrics), as overhead_s_per_step"}
        flops = self.flop_model["per_step"] if self.flop_model is not None else {}
        self.tracker.log_json(self.timer.to_dict(flops, **meta), schema.TIME_MODEL_ARTIFACT)

    # -- the loop ------------------------------------------------------------------------------
    def is_log_step(self, step: int) -> bool:
        last = self.total_steps is not None and step + 1 == self.total_steps
        return step == 0 or (step + 1) % self.log_every == 0 or last

    def record(self, metrics: dict[str, float], step: int) -> None:
        """Log metrics at ``step``; per-block ones (``<metric>/block_NN``) also go to the rows of
        ``layer_metrics.parquet``."""
        self.tracker.log_metrics(metrics, step)
        for key, value in metrics.items():
            name, _, blk = key.partition("/block_")
            if blk:
                self.layer_rows.append((step, int(blk), name, float(value)))

    def probe(self, step: int, now: bool = False) -> None:
        """Probe as step ``step`` (the weights after ``step`` updates); once per step. With
        ``background``, on a copy of the weights in the background thread unless ``now``."""
        if self.probes is None or step == self._last_probe or (self.probes.steps and self.probes.steps[-1] == step):
            return
        self._last_probe = step
        self.wait()   # one probe at a time, in step order (the copy is overwritten below)
        if self._pool is None or now:
            self._recorded(step, self.probes.probe(None, step))
            return
        with torch.no_grad():
            if self._shadow is None:
                copied = copy.deepcopy(self.model)
                for p in copied.parameters():
                    p.grad = None
                    p.requires_grad_(False)
                self._shadow = ProbeTarget([copied.get_submodule(n) for n in self._block_names],
                                           functools.partial(self._forward, copied), [copied])
            else:
                self._shadow.owners[0].load_state_dict(self.model.state_dict())
        self._pending = (step, self._pool.submit(self.probes.probe, None, step, self._shadow))

    def _recorded(self, step: int, metrics: dict[str, float]) -> None:
        self.record(metrics, step)
        if not self.tracker.enabled:
            return
        # The features once, in their own file (checkpoints keep only the probe steps), written
        # in the writer thread: serialising and fsyncing them is a fifth of a probe's time.
        state = self.probes.features_at(-1)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerlock-probe-file")
        self._writes.append(self._writer.submit(self.tracker.log_file, schema.probe_artifact(step),
                                                lambda f: torch.save(state, f)))

    def _written(self, block: bool) -> None:
        """Raise a failed probe-file write here; ``block``: wait for every write first."""
        done = [w for w in self._writes if block or w.done()]
        self._writes = [w for w in self._writes if w not in done]
        for w in done:
            w.result()

    def wait(self, block: bool = True) -> None:
        """Log the background probe's results (``block=False``: only if it has finished) and,
        with ``block``, finish writing every probe's features file. The trainer calls it before
        a checkpoint, whose probe history must include them and find their files."""
        if self._pending is not None and (block or self._pending[1].done()):
            (step, future), self._pending = self._pending, None
            self._recorded(step, future.result())
        self._written(block)

    def stored_features(self, step: int) -> list[torch.Tensor]:
        """The features of this run's probe at ``step``: the local copy, else the stored artifact
        (what :meth:`core.probes.ProbeRunner.load_state_dict` needs to resume)."""
        self._written(block=True)
        name = schema.probe_artifact(step)
        path = self.tracker.local_file(name)
        if path is None:
            path = self.tracker.download(name, tempfile.mkdtemp(prefix="layerlock-probe-"))
        return torch.load(path, map_location="cpu", weights_only=True)["features"]

    def probe_if_due(self, step: int) -> None:
        self.wait(block=False)
        if self.every is not None and step % self.every == 0:
            self.probe(step)

    def after_backward(self, step: int) -> None:
        """Call after ``loss.backward()`` and before ``optimizer.step()`` (and before gradient
        clipping: ``grad_norm`` is the raw gradient). Probes when due; at log steps, logs the
        per-block gradient norms and keeps the weights for the update ratio."""
        log = self.is_log_step(step)
        due = self.every is not None and step % self.every == 0
        if not (log or due or self._pending is not None or self._writes):
            return   # most steps: nothing to do (a few microseconds, so not counted as the monitor's)
        t0, c0 = time.perf_counter(), time.process_time()
        self.probe_if_due(step)
        if log:
            self.record(block_grad_norms(self._block_params), step)
            self._snapshot = snapshot_blocks(self._block_params)
        self._in_calls = (self._in_calls[0] + time.perf_counter() - t0, self._in_calls[1] + time.process_time() - c0)

    def after_step(self, step: int, loss: torch.Tensor | float | None = None) -> None:
        """Call after ``optimizer.step()``. At log steps: the update ratio per block and (unless
        ``run_metrics=False``) ``train/loss`` (mean of the losses passed since the last log step),
        ``train/frozen_blocks``, ``train/step_ms``, ``train/wall_s`` and, with a FLOP model,
        cumulative ``train/flops``. The step's time, less the time spent inside the monitor, goes to
        ``time_model.json`` under its frozen-prefix length."""
        now, cpu_now = time.perf_counter(), time.process_time()
        frozen = frozen_prefix_length(self.blocks)
        if self.run_metrics:
            # Filed at the next log step (_settle): a quiet step's call stays a list append.
            self._steps.append((now, cpu_now, self._in_calls, frozen,
                                loss.detach() if isinstance(loss, torch.Tensor) else loss))
        if self._snapshot is not None:
            self.record(update_ratios(self._block_params, self._snapshot), step)
            self._snapshot = None
        self.last_step = step
        if self.run_metrics and self.is_log_step(step):
            self._log_step(step, frozen)
        # What this call spent belongs to the monitor, not to the next step.
        self._in_calls = (time.perf_counter() - now, time.process_time() - cpu_now)

    def _settle(self) -> None:
        """File the steps seen since the last log step: their times (less the monitor's) in the
        time model under their frozen-prefix length, their FLOPs and losses."""
        per_step = self.flop_model["per_step"] if self.flop_model is not None else None
        for now, cpu_now, (in_wall, in_cpu), frozen, loss in self._steps:
            whole, cpu_whole = now - self._tick, cpu_now - self._cpu_tick
            self._timer.add(frozen, whole - in_wall, whole, cpu_whole - in_cpu, cpu_whole)
            self._interval_s += whole
            self._interval_steps += 1
            self._tick, self._cpu_tick = now, cpu_now
            if per_step is not None:
                self.flops_total += per_step[str(frozen)]
            if loss is not None:
                self._losses.append(loss if isinstance(loss, torch.Tensor) else torch.tensor(float(loss)))
        self._steps.clear()

    def _log_step(self, step: int, frozen: int) -> None:
        self._settle()
        self.wall_s += self._interval_s
        metrics = {schema.FROZEN_BLOCKS: frozen, schema.STEP_MS: 1000 * self._interval_s / self._interval_steps,
                   schema.WALL_S: self.wall_s}
        if self._losses:
            metrics[schema.LOSS] = float(torch.stack([v.float().reshape(()) for v in self._losses]).mean())
        if self.flop_model is not None:
            metrics[schema.FLOPS] = self.flops_total
        self.record(metrics, step)
        self.tracker.submit()
        self._losses, self._interval_s, self._interval_steps = [], 0.0, 0

    # -- the end -------------------------------------------------------------------------------
    def close(self, step: int | None = None, *, final_probe: bool = True, status: str = "FINISHED",
              reason: str | None = None) -> None:
        """The final probe at ``step`` (default: the number of steps seen), ``cka_final`` for every
        probe, the probe features (``probe/``) and ``layer_metrics.parquet``; ends the run if the
        monitor started it (``status``; a FAILED run records ``reason``). ``final_probe=False``:
        only the artifacts (a run stopped early). Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        except Exception:
            if status == "FINISHED":
                raise   # else the run is failing already: its own error is the one to report
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        at = step if step is not None else (self.last_step + 1 if self.last_step is not None else 0)
        if final_probe and self.probes is not None and status == "FINISHED":
            self.probe(at, now=True)
            for s, values in self.probes.final().items():
                self.record(values, s)
        try:
            self._written(block=True)
        except Exception:
            if status == "FINISHED":
                raise
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
        self.log_time_model()
        if self.tracker.enabled and self.layer_rows:
            frame = self.layer_frame()
            self.tracker.log_file(schema.LAYER_METRICS_ARTIFACT, lambda f: frame.to_parquet(f, index=False))
        if not self._steps_logged and self.last_step is not None:
            self.tracker.log_params({"train.steps": self.last_step + 1})
        if self._owns_run and status == "FAILED":
            self.tracker.fail(reason or "failed")
        elif self._owns_run:
            self.tracker.finish(status)
        else:
            self.tracker.flush()

    def layer_frame(self):
        """The per-block rows as the tidy frame of ``layer_metrics.parquet``: step, block, metric, value."""
        import pandas as pd

        frame = pd.DataFrame(self.layer_rows, columns=["step", "block", "metric", "value"])
        return frame.drop_duplicates(["step", "block", "metric"], keep="last")

    def __enter__(self) -> LayerMonitor:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:
            self.close()
        else:
            self.close(final_probe=False, status="FAILED", reason=f"{kind.__name__}: {error}")


def _optimizer_like(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """A new optimizer of ``optimizer``'s class and parameter groups (settings included), with no
    state; None, with a warning, where its class cannot be built that way."""
    groups = [dict(g) for g in optimizer.param_groups]
    try:
        return type(optimizer)(groups)
    except Exception as err:   # noqa: BLE001 -- any constructor: the calibration then leaves the update out
        warnings.warn(f"LayerMonitor: cannot build a {type(optimizer).__name__} for the timing calibration "
                      f"({first_line(err)}); it times forward and backward only", stacklevel=3)
        return None


def _batch_len(batch: Any) -> int:
    """Clips in a probe batch: the first dimension of its first tensor (0 if there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 0
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            n = _batch_len(item)
            if n:
                return n
    return 0


__all__ = ["LayerMonitor", "apply_schedule", "freeze_prefix", "frozen_prefix_length"]
