"""Per-block convergence probes for any PyTorch model in any training loop.

``LayerMonitor`` logs, to an MLflow run, what the trainer logs: ``cka_prev``, ``cka_init``,
``cka_final``, ``grad_norm``, ``update_ratio``, ``eff_rank``, ``feat_std`` per block
(``<metric>/block_NN``), the tidy ``layer_metrics.parquet``, the stored probe features
(``probe/``) and, given a training step to count, ``flop_model.json``. So ``python -m analysis
convergence|schedule`` and the dashboard read a run of your own loop like one of the trainer's;
:func:`core.freezing.apply_schedule` then applies a derived schedule in that loop::

    mon = LayerMonitor(blocks, ProbeSpec(probe_batch, forward, every=50), model=model)
    for step in range(steps):
        loss = loss_fn(model(x), y)
        loss.backward()
        mon.after_backward(step)     # probe (every ``every`` steps), gradient norms, weight snapshot
        optimizer.step()
        optimizer.zero_grad()
        mon.after_step(step, loss)   # update ratios, run-level metrics
    mon.close()                      # final probe, cka_final, artifacts

The monitor is made of three named parts: what to probe (:class:`ProbeSpec`), where to log (a
:class:`core.tracking.Writer`: by default :func:`core.tracking.open_writer`'s run) and what a
step costs (:class:`CostSpec`: the FLOP model and the timing calibration).

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
per-block artifacts through this class too (``loop_metrics=False``), and checkpoints and
resumes it through :meth:`LayerMonitor.state_dict` / :meth:`LayerMonitor.load_state_dict`.
"""

from __future__ import annotations

import copy
import functools
import gc
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core import schema
from core.config import ProbeConfig
from core.cost import CostSpec, calibrate_on_model, check_int
from core.errors import LayerLockError
from core.flops import count_flop_model
from core.freezing import apply_schedule, freeze_prefix, frozen_prefix_length  # noqa: F401  (one import for users)
from core.probes import ProbeRunner, ProbeTarget, block_grad_norms, snapshot_blocks, update_ratios
from core.timemodel import StepTimer
from core.tracking import NullWriter, RunReader, Writer, open_writer


@dataclass(frozen=True)
class ProbeSpec:
    """What to probe, and how often.

    ``batch``: a fixed batch (held-out inputs), passed to ``forward(batch)``, which runs the model
    on it (its return value is ignored; block outputs are read by hooks and turned into
    ``(clips, positions, dim)`` by :func:`core.probes.clips_positions_dim`, or by ``features``).
    ``every``: probe interval in steps. ``tokens_per_clip``: positions read per clip (a seeded
    subset, ``seed``) out of ``n_positions`` (default: what the first probe sees). ``debiased``:
    debiased CKA. ``background``: each probe reads a copy of the model's weights in a background
    thread while training goes on (worth it where a CPU core is idle, or on a GPU); the numbers
    are those of a probe in the loop. Needs the monitor's ``model=`` (the blocks must be its
    submodules), and ``forward`` then takes the model to run as well: ``forward(model, batch)``.
    Its results are logged when ready, at the latest by the next probe, ``wait()`` or
    ``close()``; the forward must draw no random numbers in eval mode (the RNG is not forked in
    the background thread)."""

    batch: Any
    forward: Callable[..., Any]
    every: int = 50
    tokens_per_clip: int = 32
    debiased: bool = True
    seed: int = 0
    features: Callable[[Any], torch.Tensor] | None = None
    n_positions: int | None = None
    background: bool = False

    def __post_init__(self) -> None:
        check_int("every", self.every, 1)
        check_int("tokens_per_clip", self.tokens_per_clip, 1)


class LayerMonitor:
    """Convergence probes on a list of modules (the blocks, in depth order) of any model.

    ``blocks``: the modules whose outputs are probed and whose parameters make up each block.
    ``probe``: what to probe (:class:`ProbeSpec`); None: no probes, gradient metrics only.
    ``model``: the whole model. The probe runs it in eval mode (else only the blocks); counting
    FLOPs and background probes need it.
    ``writer``: where to log: a :class:`core.tracking.Tracker` (the trainer's, or
    :func:`core.tracking.open_writer`'s for a run id, an ``mlflow.start_run()`` run or a new run
    with a name and experiment: its run is the caller's to end), a
    :class:`core.tracking.NullWriter` (log nothing), or None: ``open_writer()``, the active MLflow
    run, else a new run that :meth:`close` ends.
    ``cost``: what a step costs (:class:`CostSpec`: the FLOP model and the timing calibration).
    ``total_steps``: logged as ``train.steps`` (else the number of steps seen, at close).
    ``params``: more params to log. ``loop_metrics=False``: the caller logs the run's params,
    its ``train/*`` metrics and its step times itself (the trainer); the monitor then logs only
    the per-block metrics and artifacts, and times nothing.

    The blocks' parameters are listed once, here (the gradient norms and update ratios read
    those lists): attach the monitor after anything that replaces a model's parameter objects
    (FSDP's flattening, say; ``.to(device)`` keeps them).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        probe: ProbeSpec | None,
        *,
        model: nn.Module | None = None,
        writer: Writer | None = None,
        cost: CostSpec | None = None,
        log_every: int = 10,
        total_steps: int | None = None,
        params: dict[str, Any] | None = None,
        loop_metrics: bool = True,
    ) -> None:
        self.blocks = list(blocks)
        if not self.blocks or not all(isinstance(b, nn.Module) for b in self.blocks):
            raise LayerLockError("blocks must be a non-empty list of torch.nn.Module, in depth order")
        if probe is not None and not isinstance(probe, ProbeSpec):
            raise LayerLockError(f"probe must be a ProbeSpec or None, got {type(probe).__name__}")
        if writer is not None and not isinstance(writer, Writer):
            raise LayerLockError(
                "writer must be a core.tracking writer (a Tracker, open_writer(...), NullWriter()) "
                f"or None; got {type(writer).__name__}"
            )
        self._block_params = [list(b.parameters()) for b in self.blocks]  # read once: see the class docstring
        check_int("log_every", log_every, 1)
        check_int("total_steps", total_steps, 1)
        if cost is not None and model is None:
            raise LayerLockError(
                "cost= needs model=: counting FLOPs runs real steps of train_step and puts the "
                "model's gradients and buffers back afterwards"
            )
        self.model, self.stem = model, list(cost.stem) if cost is not None else []
        self.probe_spec = probe
        self._forward, self._pool, self._block_names = (probe.forward if probe else None), None, []
        forward = self._forward
        if probe is not None and probe.background:
            names = {id(m): name for name, m in (model.named_modules() if model is not None else ())}
            if model is None or any(id(b) not in names for b in self.blocks):
                raise LayerLockError(
                    "background=True needs model= with the blocks among its submodules: "
                    "the probe reads a copy of the model's weights"
                )
            self._block_names = [names[id(b)] for b in self.blocks]
            forward = functools.partial(forward, model)  # the loop's own probes (the final one)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerlock-probe")
        self._shadow: ProbeTarget | None = None  # the copy a background probe reads
        # Each probe's features file is written (fsynced) by a thread of its own, off the loop.
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []
        self._pending: tuple[int, Future[dict[str, float]]] | None = None
        self._last_probe: int | None = None
        self.every = probe.every if probe is not None else None
        self.log_every, self.total_steps = log_every, total_steps
        self.loop_metrics = loop_metrics
        self.probes: ProbeRunner | None = None
        if probe is not None:
            cfg = ProbeConfig(
                every=probe.every,
                batch_size=max(4, _batch_len(probe.batch)),
                tokens_per_clip=probe.tokens_per_clip,
                debiased=probe.debiased,
            )
            self.probes = ProbeRunner(
                cfg,
                probe.batch,
                probe.n_positions,
                probe.seed,
                blocks=self.blocks,
                forward=forward,
                owner=model,
                features=probe.features,
            )
        self.flop_model = (
            count_flop_model(self.blocks, cost.train_step, model=model, stem=self.stem) if cost is not None else None
        )
        # time_model.json: calibration now, then every training step at its frozen-prefix length.
        self._timer = StepTimer()
        self.calibration = cost.calibration if cost is not None and loop_metrics else 0
        self._calibrated = ""
        if self.calibration:
            self._calibrated = calibrate_on_model(cost, self.blocks, model, self._timer)
        self._owns_run = False
        if writer is None:
            writer = open_writer()
            self._owns_run = writer.created  # a new run, this monitor's to end; the active run is its owner's
        self.writer: Writer = writer
        self.layer_rows: list[tuple[int, int, str, float]] = []  # (step, block, metric, value)
        self._snapshot: list[list[torch.Tensor] | None] | None = None
        self._losses: list[torch.Tensor] = []
        self._interval_s = 0.0
        self._interval_steps = 0
        self._in_calls = (0.0, 0.0)  # wall and CPU seconds inside the monitor since the last step ended
        # Per step since the last log step: (end time, CPU time, in-call times, frozen prefix, loss).
        self._steps: list[tuple[float, float, tuple[float, float], int, Any]] = []
        self.wall_s = 0.0
        self.flops_total = 0.0
        self.last_step: int | None = None
        self._closed = False
        self._steps_logged = not loop_metrics or total_steps is not None or "train.steps" in (params or {})
        if loop_metrics:
            self.writer.log_params(self._params(params))
        if self.flop_model is not None:
            self.writer.log_json(self.flop_model, schema.FLOP_MODEL_ARTIFACT)
        self.log_time_model()
        # A full garbage collection now, a one-off cost of attaching: importing MLflow (and what it
        # pulls in) leaves hundreds of thousands of new objects, and the first full collection that
        # walks them would otherwise fall in a training step, typically the first probe's. After
        # it, the next full collection waits for a quarter as many again.
        gc.collect()
        self._tick, self._cpu_tick = time.perf_counter(), time.process_time()

    @property
    def timer(self) -> StepTimer:
        """The step times so far (``time_model.json``'s record), every step seen filed."""
        self._settle()
        return self._timer

    @property
    def run_id(self) -> str | None:
        return self.writer.run_id

    def _params(self, extra: dict[str, Any] | None) -> dict:
        out: dict[str, Any] = {
            "model.depth": len(self.blocks),
            "train.log_every": self.log_every,
            "monitor.blocks": ", ".join(type(b).__name__ for b in self.blocks),
        }
        if self.total_steps is not None:
            out["train.steps"] = self.total_steps
        spec = self.probe_spec
        if spec is not None:
            out.update(
                {
                    "probe.every": spec.every,
                    "probe.batch_size": _batch_len(spec.batch),
                    "probe.tokens_per_clip": spec.tokens_per_clip,
                    "probe.debiased": spec.debiased,
                }
            )
        if self.model is not None:
            out["monitor.parameters"] = sum(p.numel() for p in self.model.parameters())
        return {**out, **(extra or {})}

    def log_time_model(self) -> None:
        """``time_model.json`` (``core.timemodel``): the calibration and the training steps so far."""
        if not self.loop_metrics or not self.writer.stores or not (self.timer.training or self.timer.calibration):
            return
        device = next((p.device.type for p in self.model.parameters()), "cpu") if self.model is not None else "cpu"
        meta = {
            "n_blocks": len(self.blocks),
            "device": device,
            "threads": torch.get_num_threads(),
            "calibration_steps": self.calibration,
            "calibration_step": self._calibrated or None,
            "excluded": "time inside the monitor's calls (probes, gradient metrics), as overhead_s_per_step",
        }
        flops = self.flop_model["per_step"] if self.flop_model is not None else {}
        self.writer.log_json(self.timer.to_dict(flops, **meta), schema.TIME_MODEL_ARTIFACT)

    # -- the loop ------------------------------------------------------------------------------
    def is_log_step(self, step: int) -> bool:
        last = self.total_steps is not None and step + 1 == self.total_steps
        return step == 0 or (step + 1) % self.log_every == 0 or last

    def record(self, metrics: dict[str, float], step: int) -> None:
        """Log metrics at ``step``; per-block ones (``<metric>/block_NN``) also go to the rows of
        ``layer_metrics.parquet``."""
        self.writer.log_metrics(metrics, step)
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
        self.wait()  # one probe at a time, in step order (the copy is overwritten below)
        if self._pool is None or now:
            self._recorded(step, self.probes.probe(None, step))
            return
        with torch.no_grad():
            if self._shadow is None:
                copied = copy.deepcopy(self.model)
                for p in copied.parameters():
                    p.grad = None
                    p.requires_grad_(False)
                self._shadow = ProbeTarget(
                    [copied.get_submodule(n) for n in self._block_names],
                    functools.partial(self._forward, copied),
                    [copied],
                )
            else:
                self._shadow.owners[0].load_state_dict(self.model.state_dict())
        self._pending = (step, self._pool.submit(self.probes.probe, None, step, self._shadow))

    def _recorded(self, step: int, metrics: dict[str, float]) -> None:
        self.record(metrics, step)
        if not self.writer.stores:
            return
        # The features once, in their own file (checkpoints keep only the probe steps), written
        # in the writer thread: serialising and fsyncing them is a fifth of a probe's time.
        state = self.probes.features_at(-1)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerlock-probe-file")
        self._writes.append(
            self._writer.submit(self.writer.log_file, schema.probe_artifact(step), lambda f: torch.save(state, f))
        )

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

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: the per-block rows logged so far (``layer_metrics.parquet``'s) and
        the probe history (its steps and positions; the features stay in the run's ``probe/``
        files). A pending background probe and the probe files are finished first, so the state
        includes them and finds their files."""
        self.wait()
        return {
            "layer_rows": [list(r) for r in self.layer_rows],
            "probe": self.probes.state_dict() if self.probes is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any], reader: RunReader | None = None) -> None:
        """Continue from :meth:`state_dict`'s ``state``: the rows, and the probe history, whose
        features ``reader`` (the run's :class:`core.tracking.RunReader`) reads from the run's
        stored probe files (``cka_prev`` and ``cka_init`` of the next probes need them)."""
        self.layer_rows = [tuple(r) for r in state["layer_rows"]]
        if self.probes is not None and state.get("probe"):
            if reader is None:
                raise LayerLockError("a probe history to restore needs the run's reader (its stored probe features)")
            self.probes.load_state_dict(state["probe"], functools.partial(_stored_features, reader))

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
            return  # most steps: nothing to do (a few microseconds, so not counted as the monitor's)
        if self.loop_metrics:
            t0, c0 = time.perf_counter(), time.process_time()
        self.probe_if_due(step)
        if log:
            self.record(block_grad_norms(self._block_params), step)
            self._snapshot = snapshot_blocks(self._block_params)
        if self.loop_metrics:
            self._in_calls = (
                self._in_calls[0] + time.perf_counter() - t0,
                self._in_calls[1] + time.process_time() - c0,
            )

    def after_step(self, step: int, loss: torch.Tensor | float | None = None) -> None:
        """Call after ``optimizer.step()``. At log steps: the update ratio per block and (unless
        ``loop_metrics=False``) ``train/loss`` (mean of the losses passed since the last log step),
        ``train/frozen_blocks``, ``train/step_ms``, ``train/wall_s`` and, with a FLOP model,
        cumulative ``train/flops``. The step's time, less the time spent inside the monitor, goes to
        ``time_model.json`` under its frozen-prefix length."""
        if not self.loop_metrics:  # the caller times its steps and logs its run-level metrics
            if self._snapshot is not None:
                self.record(update_ratios(self._block_params, self._snapshot), step)
                self._snapshot = None
            self.last_step = step
            return
        now, cpu_now = time.perf_counter(), time.process_time()
        frozen = frozen_prefix_length(self.blocks)
        # Filed at the next log step (_settle): a quiet step's call stays a list append.
        self._steps.append(
            (now, cpu_now, self._in_calls, frozen, loss.detach() if isinstance(loss, torch.Tensor) else loss)
        )
        if self._snapshot is not None:
            self.record(update_ratios(self._block_params, self._snapshot), step)
            self._snapshot = None
        self.last_step = step
        if self.is_log_step(step):
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
        metrics = {
            schema.FROZEN_BLOCKS: frozen,
            schema.STEP_MS: 1000 * self._interval_s / self._interval_steps,
            schema.WALL_S: self.wall_s,
        }
        if self._losses:
            metrics[schema.LOSS] = float(torch.stack([v.float().reshape(()) for v in self._losses]).mean())
        if self.flop_model is not None:
            metrics[schema.FLOPS] = self.flops_total
        self.record(metrics, step)
        self.writer.submit()
        self._losses, self._interval_s, self._interval_steps = [], 0.0, 0

    # -- the end -------------------------------------------------------------------------------
    def close(
        self, step: int | None = None, *, final_probe: bool = True, status: str = "FINISHED", reason: str | None = None
    ) -> None:
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
                raise  # else the run is failing already: its own error is the one to report
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
        if self.writer.stores and self.layer_rows:
            frame = self.layer_frame()
            self.writer.log_file(schema.LAYER_METRICS_ARTIFACT, lambda f: frame.to_parquet(f, index=False))
        if not self._steps_logged and self.last_step is not None:
            self.writer.log_params({"train.steps": self.last_step + 1})
        if self._owns_run and status == "FAILED":
            self.writer.fail(reason or "failed")
        elif self._owns_run:
            self.writer.finish(status)
        else:
            self.writer.flush()

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


def _stored_features(reader: RunReader, step: int) -> list[torch.Tensor]:
    """The features of a run's probe at ``step``: the local copy, else the stored artifact."""
    name = schema.probe_artifact(step)
    path = reader.local_file(name)
    if path is None:
        path = reader.download(name, tempfile.mkdtemp(prefix="layerlock-probe-"))
    return torch.load(path, map_location="cpu", weights_only=True)["features"]


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


__all__ = [
    "CostSpec",
    "LayerMonitor",
    "NullWriter",
    "ProbeSpec",
    "apply_schedule",
    "freeze_prefix",
    "frozen_prefix_length",
    "open_writer",
]
