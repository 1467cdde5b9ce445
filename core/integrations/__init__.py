"""LayerLock in a training framework: what the Hugging Face and Lightning callbacks share.

:class:`LayerLockSession` is the framework-free part of both callbacks
(``core.integrations.huggingface``, ``core.integrations.lightning``): it finds the blocks, attaches
a :class:`core.monitor.LayerMonitor`, applies a freezing schedule through the framework's own
optimizer (:func:`core.freezing.apply_schedule`: frozen parameters keep no optimizer state and
stay bitwise unchanged), computes LayerLock's latent loss (:func:`core.objectives.latent_loss`)
at the stage the schedule is in, and keeps its state for the framework's checkpoint, so a run
resumed in the middle of a frozen stage goes on as one that never stopped. docs/integrations.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from core import schema
from core.cost import CostSpec
from core.errors import LayerLockError
from core.freezing import FreezeSchedule, apply_schedule, as_schedule, frozen_prefix_length
from core.monitor import LayerMonitor, ProbeSpec
from core.objectives import latent_loss, prefix_output
from core.tracking import open_writer

# Where the common model families keep their blocks (in depth order) and what runs before them.
BLOCK_PATHS = (
    "videomae.encoder.layer",  # transformers VideoMAEForPreTraining / VideoMAEForVideoClassification
    "encoder.layer",  # transformers VideoMAEModel, ViTModel
    "vit.encoder.layer",  # transformers ViT heads
    "blocks",  # timm ViT, this project's VideoMAE
    "encoder.layers",
)  # torchvision ViT
STEM_PATHS = (
    "videomae.embeddings",
    "embeddings",
    "vit.embeddings",  # transformers
    "patch_embed",
    "cls_token",
    "reg_token",
    "pos_embed",  # timm
    "conv_proj",
    "class_token",
    "encoder.pos_embedding",
)  # torchvision


def check_version(framework: str, version: str, supported: tuple[str, str]) -> None:
    """LayerLockError unless ``version`` is within ``supported`` = (lowest, first unsupported)."""

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])

    lo, hi = supported
    if not key(lo) <= key(version) < key(hi):
        raise LayerLockError(
            f"{framework} {version} is not supported: LayerLock's callback supports {framework} >={lo},<{hi}"
        )


def _attr(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _roots(model: nn.Module) -> list[nn.Module]:
    """Where to look for blocks and stem: the model, then its direct children (a LightningModule
    or a wrapper that holds the network as an attribute)."""
    return [model, *model.children()]


def find_blocks(model: nn.Module, blocks: Sequence[nn.Module] | str | None = None) -> list[nn.Module]:
    """The model's blocks in depth order: ``blocks`` as given (modules of ``model``, or a dotted
    path such as ``"videomae.encoder.layer"``), else the first of :data:`BLOCK_PATHS` found on
    the model or one of its direct children."""
    if isinstance(blocks, str):
        found = _attr(model, blocks)
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise LayerLockError(f"blocks {blocks!r}: the model ({type(model).__name__}) has no list of blocks there")
        return list(found)
    if blocks is not None:
        blocks = list(blocks)
        own = {id(m) for m in model.modules()}
        if not blocks or any(not isinstance(b, nn.Module) or id(b) not in own for b in blocks):
            raise LayerLockError(
                f"blocks are not in the model: every block must be a submodule of the "
                f"{type(model).__name__} being trained, in depth order"
            )
        return blocks
    for root in _roots(model):
        for path in BLOCK_PATHS:
            found = _attr(root, path)
            if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found) > 0:
                return list(found)
    raise LayerLockError(
        f"cannot find the blocks of a {type(model).__name__} (looked for "
        f"{', '.join(BLOCK_PATHS)}): pass blocks=[...] explicitly"
    )


def find_stem(model: nn.Module, blocks: Sequence[nn.Module]) -> list[nn.Module | nn.Parameter]:
    """What runs before block 0 and freezes with it: the :data:`STEM_PATHS` of the module that
    holds ``blocks`` (the model or one of its direct children)."""
    first = blocks[0]
    for root in _roots(model):
        if any(m is first for m in root.modules()):
            out = [found for path in STEM_PATHS if isinstance(found := _attr(root, path), (nn.Module, nn.Parameter))]
            if out:
                return out
    return []


class LayerLockSession:
    """One training run's LayerLock state: blocks, schedule, monitor, latent loss, checkpointed state.

    ``schedule``: a schedule dict (the JSON of ``python -m analysis schedule``), a
    :class:`core.freezing.FreezeSchedule` or None (monitor only). ``latent``: add LayerLock's
    latent loss (the caller supplies predictions; :meth:`latent_loss`). ``probe_batch`` and
    ``probe_forward(batch)``: the monitor's fixed batch and how to run the model on it (None: no
    probes, gradient metrics only). ``train_step()``: one forward and loss on a fixed batch, for
    ``flop_model.json`` (and, with ``calibration``, the time model's calibration). The rest goes
    to :class:`core.monitor.LayerMonitor`.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: FreezeSchedule | dict | None = None,
        *,
        blocks: Sequence[nn.Module] | str | None = None,
        stem: Iterable[nn.Module | nn.Parameter] | None = None,
        latent: bool = False,
        latent_weight: float = 1.0,
        probe_batch: Any = None,
        probe_forward: Callable[[Any], Any] | None = None,
        every: int | None = 50,
        log_every: int = 10,
        train_step: Callable[[], torch.Tensor] | None = None,
        calibration: int = 0,
        run: Any = None,
        tracking_uri: str | None = None,
        experiment: str = "layerlock",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.blocks = find_blocks(model, blocks)
        self.stem = list(stem) if stem is not None else find_stem(model, self.blocks)
        self.schedule = as_schedule(schedule, len(self.blocks)) if schedule is not None else None
        if latent and self.schedule is None:
            raise LayerLockError("latent=True needs a schedule: the latent target is the last frozen block's output")
        if (probe_batch is None) != (probe_forward is None):
            raise LayerLockError("probe_batch and probe_forward go together (or neither: no probes)")
        self.latent, self.latent_weight = latent, float(latent_weight)
        self.probe = (
            ProbeSpec(probe_batch, probe_forward, every=every)
            if probe_batch is not None and every is not None
            else None
        )
        self.train_step, self.calibration, self.log_every, self.params = train_step, calibration, log_every, params
        # Where to log: ``run`` (an MLflow run id or run, e.g. a framework logger's), else a new run.
        self.run, self.tracking_uri = run, tracking_uri
        self._writer_args = dict(
            experiment=experiment,
            run_name=run_name,
            tags={schema.TAG_METHOD: "layerlock" if latent else schema.METHOD_OWN_LOOP, **(tags or {})},
        )
        self.monitor: LayerMonitor | None = None
        self._owns_run = False
        self._total_steps: int | None = None
        self._losses: dict[str, list[float]] = {schema.LOSS_PIXEL: [], schema.LOSS_LATENT: []}

    # -- the run ---------------------------------------------------------------------------------
    def start(
        self,
        step: int,
        optimizer: torch.optim.Optimizer | None,
        total_steps: int | None = None,
        state: dict | None = None,
    ) -> None:
        """Attach the monitor (continuing ``state``'s MLflow run on a resume) and freeze the prefix
        the schedule holds at ``step`` through ``optimizer``."""
        self.begin_step(step, optimizer)  # before the monitor's FLOP count, which puts the prefix back as it is
        if state is not None:
            writer = open_writer(state["run_id"], tracking_uri=self.tracking_uri, **self._writer_args)
            self._owns_run = bool(state.get("owns_run"))
        else:
            writer = open_writer(self.run, tracking_uri=self.tracking_uri, **self._writer_args)
            self._owns_run = writer.created  # a run it started is this session's to end; a logger's is not
        # A resume keeps the FLOP model and calibration the run logged when it began.
        cost = (
            CostSpec(self.train_step, stem=self.stem, optimizer=optimizer, calibration=self.calibration)
            if self.train_step is not None and state is None
            else None
        )
        params = dict(self.params or {})
        if state is not None and state.get("total_steps") is not None:
            # MLflow keeps a param's first value: a resume with another max_steps keeps the logged one.
            params["train.steps"], total_steps = state["total_steps"], None
        self._total_steps = total_steps if state is None else state.get("total_steps")
        self.monitor = LayerMonitor(
            self.blocks,
            self.probe,
            model=self.model,
            writer=writer,
            cost=cost,
            log_every=self.log_every,
            total_steps=total_steps,
            params=params,
        )
        if state is not None:
            self.load_state_dict(state)

    def begin_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> int:
        """Freeze the prefix the schedule holds at ``step`` (before the step's forward); returns it."""
        if self.schedule is None:
            return frozen_prefix_length(self.blocks)
        return apply_schedule(self.schedule, self.blocks, step, optimizer, stem=self.stem)

    @property
    def stage(self) -> int:
        """The schedule's stage now: the frozen-prefix length (the latent target is block stage-1)."""
        return frozen_prefix_length(self.blocks)

    def latent_loss(
        self, run_input: Callable[[], Any], predictions: torch.Tensor, mask_idx: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """LayerLock's latent loss now (unweighted), or None before the first stage.
        ``run_input()`` runs the model's stem and blocks on the *unmasked* input (it is stopped
        after block stage-1); ``predictions (B, K, dim)`` at the masked positions ``mask_idx``."""
        return latent_loss(
            self.blocks, self.stage, lambda k: prefix_output(self.blocks, k, run_input), predictions, mask_idx
        )

    def add_latent(
        self,
        loss: torch.Tensor,
        run_input: Callable[[], Any],
        predictions: torch.Tensor,
        mask_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``loss`` (the model's own, e.g. its pixel loss) plus the weighted latent loss once the
        schedule's first stage has begun (with ``latent=True``); both parts noted for logging."""
        latent = self.latent_loss(run_input, predictions, mask_idx) if self.latent else None
        self.note_losses(loss.detach(), None if latent is None else latent.detach())
        return loss if latent is None else loss + self.latent_weight * latent

    def note_losses(self, pixel: torch.Tensor | float | None, latent: torch.Tensor | float | None) -> None:
        """The step's loss parts, logged (as means) at the monitor's log steps."""
        for key, value in ((schema.LOSS_PIXEL, pixel), (schema.LOSS_LATENT, latent)):
            if value is not None:
                self._losses[key].append(float(value))

    def after_backward(self, step: int) -> None:
        self._require_started().after_backward(step)

    def after_step(self, step: int, loss: torch.Tensor | float | None = None) -> None:
        mon = self._require_started()
        mon.after_step(step, loss)
        if mon.is_log_step(step):
            means = {k: sum(v) / len(v) for k, v in self._losses.items() if v}
            if means:
                mon.record(means, step)
            self._losses = {k: [] for k in self._losses}

    def close(
        self, step: int | None = None, *, final_probe: bool = True, status: str = "FINISHED", reason: str | None = None
    ) -> None:
        """The monitor's end (final probe, artifacts); the run ends too if this session started it,
        else its writer lets go of it (a framework logger's run is the logger's to end), so that a
        resume in this process (or a sync) can take it over."""
        if self.monitor is None:
            return
        self.monitor.close(step, final_probe=final_probe, status=status, reason=reason)
        writer = self.monitor.writer
        if self._owns_run and status == "FAILED":
            writer.fail(reason or "failed")
        elif self._owns_run:
            writer.finish(status)
        else:
            writer.flush()
            writer.close()

    def _require_started(self):
        if self.monitor is None:
            raise LayerLockError("the LayerLock session has not started: the callback's train-begin hook did not run")
        return self.monitor

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the framework's checkpoint keeps: the MLflow run (and whether this session ends it),
        the frozen prefix, the monitor's rows and probe history (the features are in the run's
        ``probe/`` files), the step times and the loss parts not yet logged."""
        mon = self._require_started()
        return {
            "run_id": mon.run_id,
            "owns_run": self._owns_run,
            "total_steps": self._total_steps,
            "frozen": self.stage,
            "monitor": mon.state_dict(),
            "time_model": mon.timer.state_dict(),
            "schedule": self.schedule.to_dict() if self.schedule is not None else None,
            "losses": {k: list(v) for k, v in self._losses.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        mon = self._require_started()
        if state.get("frozen") != self.stage:
            raise LayerLockError(
                f"the checkpoint was saved with {state.get('frozen')} frozen blocks, but the "
                f"schedule holds {self.stage} at the step resumed: resume with the same schedule"
            )
        mon.load_state_dict(state["monitor"], mon.writer.reader())
        mon.timer.load_state_dict(state.get("time_model") or {})
        self._losses = {k: list(v) for k, v in (state.get("losses") or {}).items()} or self._losses
