"""LayerLock for the Hugging Face ``Trainer``: a callback and, for the latent loss, a ``Trainer`` subclass.

::

    cb = LayerLockCallback(model, schedule, probe_batch=batch, probe_forward=lambda b: model.videomae(b),
                           latent=True)
    trainer = LayerLockTrainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()

:class:`LayerLockCallback` attaches a :class:`core.monitor.LayerMonitor` to the model's blocks
and applies the schedule at every step through the ``Trainer``'s own optimizer. Where the
``Trainer`` lets it see what it needs: the schedule at ``on_step_begin`` (before the forward),
gradient norms at ``on_pre_optimizer_step`` (the gradients are zeroed before ``on_step_end``;
with ``max_grad_norm > 0`` they are the clipped ones), update ratios at ``on_step_end``. Its state
(MLflow run, frozen prefix, probe history) goes into each checkpoint folder as
``layerlock_state.pt`` and is read back when ``trainer.train(resume_from_checkpoint=...)`` starts.

:class:`LayerLockTrainer` adds LayerLock's latent loss to the model's own loss (``compute_loss``);
:class:`VideoMAELatent` is the latent prediction of a ``VideoMAEForPreTraining`` (a linear head
on its decoder's masked-token features). docs/integrations.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from core.errors import LayerLockError
from core.integrations import LayerLockSession, check_version
from core.objectives import latent_loss, prefix_output

SUPPORTED = ("4.40", "6")  # transformers versions the callback is tested against: >=4.40,<6
STATE_FILE = "layerlock_state.pt"

try:
    import transformers
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - the extra is not installed
    raise LayerLockError("core.integrations.huggingface needs transformers: pip install 'layerlock-lab[hf]'") from err


class VideoMAELatent:
    """The student's latent predictions on a ``transformers`` ``VideoMAEForPreTraining``: a linear
    head (decoder width -> encoder width, added to the model as ``layerlock_latent_head``, so the
    ``Trainer``'s optimizer trains it) on the decoder's normalised features at the masked tokens
    (read by a forward hook on ``decoder.norm`` during the model's own forward).

    ``target_block``: None (LayerLock) for the last frozen block's output, from the schedule's
    first stage on; a block index (e.g. -1, the last) for the naive latent baseline: that block of
    the trainable network from step 0, whatever is frozen (the project's ``latent_naive``)."""

    def __init__(self, model: nn.Module, target_block: int | None = None) -> None:
        cfg = model.config
        if not hasattr(model, "decoder") or not hasattr(model, "videomae"):
            raise LayerLockError(f"VideoMAELatent needs a VideoMAEForPreTraining, got {type(model).__name__}")
        if not hasattr(model, "layerlock_latent_head"):
            model.add_module("layerlock_latent_head", nn.Linear(cfg.decoder_hidden_size, cfg.hidden_size))
        self.model, self.head, self.target_block = model, model.layerlock_latent_head, target_block
        self._features: torch.Tensor | None = None
        model.decoder.norm.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        self._features = output

    def loss(self, session: LayerLockSession, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The latent loss of the forward just run on ``inputs`` (``pixel_values``, ``bool_masked_pos``)."""
        if session.stage == 0 and self.target_block is None:
            return None
        mask = inputs["bool_masked_pos"]
        if self._features is None:
            raise LayerLockError("no decoder features: the model's forward did not run before the latent loss")
        counts = mask.sum(1)
        if not bool((counts == counts[0]).all()):
            raise LayerLockError("bool_masked_pos must mask the same number of tokens in every clip")
        # HF's decoder keeps the masked tokens last, in increasing token order: the order of nonzero().
        mask_idx = mask.nonzero()[:, 1].view(mask.shape[0], -1)
        predictions = self.head(self._features)
        self._features = None
        run = lambda: self.model.videomae(inputs["pixel_values"])  # noqa: E731
        if self.target_block is None:
            return session.latent_loss(run, predictions, mask_idx)
        n = len(session.blocks)
        if not -n <= self.target_block < n:
            raise LayerLockError(
                f"target_block={self.target_block}: the model has {n} blocks (0..{n - 1}, or -{n}..-1)"
            )
        k = self.target_block % n + 1
        return latent_loss(session.blocks, k, lambda k: prefix_output(session.blocks, k, run), predictions, mask_idx)


class LayerLockCallback(TrainerCallback):
    """Monitor, schedule and (with :class:`LayerLockTrainer`) LayerLock's latent loss in a HF ``Trainer``.

    ``model``: the model the ``Trainer`` trains; ``schedule``: a schedule dict or
    :class:`core.freezing.FreezeSchedule` (None: monitor only); ``latent``: add the latent loss
    (needs a schedule and a latent prediction: ``latent_predictor``, by default
    :class:`VideoMAELatent` for a ``VideoMAEForPreTraining``); ``flop_batch``: a fixed batch (the
    model's keyword arguments) whose step is counted for ``flop_model.json``; ``pixel_weight``: the
    weight of the model's own loss (0 with a ``latent_predictor`` for a latent-only baseline). A
    ``latent_predictor`` given without ``latent`` adds its loss without a schedule (the naive
    latent: ``VideoMAELatent(model, target_block=-1)``). Other keywords go to
    :class:`core.integrations.LayerLockSession` (blocks, stem, probe_batch, probe_forward, every,
    train_step, run, tracking_uri, experiment, tags, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Any = None,
        *,
        latent: bool = False,
        latent_predictor: Any = None,
        flop_batch: dict[str, Any] | None = None,
        pixel_weight: float = 1.0,
        **session: Any,
    ) -> None:
        check_version("transformers", transformers.__version__, SUPPORTED)
        self.model = model
        self.flop_batch = flop_batch
        if flop_batch is not None:
            session["train_step"] = self._train_step
        self.session = LayerLockSession(model, schedule, latent=latent, **session)
        self.predictor = latent_predictor or (VideoMAELatent(model) if latent else None)
        self.pixel_weight = float(pixel_weight)
        self._optimizer = None

    def _train_step(self) -> torch.Tensor:
        """The FLOP model's step (``flop_batch``): the model's own loss plus, with ``latent``, the
        latent loss at the frozen prefix being counted, so ``flop_model.json`` includes the
        target's forward over all tokens."""
        loss = self.pixel_weight * self.model(**self.flop_batch).loss
        if self.predictor is not None:
            extra = self.predictor.loss(self.session, self.flop_batch)
            if extra is not None:
                loss = loss + self.session.latent_weight * extra
        return loss

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        saved = None
        if state.global_step > 0:  # resumed: the state saved beside the checkpoint the Trainer loaded
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if not os.path.isfile(path):
                raise LayerLockError(
                    f"resuming at step {state.global_step}, but {path} is missing: the checkpoint "
                    "was not saved with LayerLockCallback"
                )
            saved = torch.load(path, map_location="cpu", weights_only=False)
        self._optimizer = optimizer
        self.session.start(state.global_step, optimizer, total_steps=state.max_steps or None, state=saved)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.session.begin_step(state.global_step, optimizer or self._optimizer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.session.after_backward(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.session.after_step(state.global_step - 1)  # global_step already counts this update

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.session.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        self.session.close(state.global_step)

    @property
    def run_id(self) -> str | None:
        return self.session.monitor.run_id if self.session.monitor is not None else None


class LayerLockTrainer(Trainer):
    """A ``Trainer`` whose loss is the model's own plus LayerLock's latent loss (weighted by the
    callback's ``latent_weight``), both logged (``train/loss_pixel``, ``train/loss_latent``)."""

    def _layerlock(self) -> LayerLockCallback | None:
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, LayerLockCallback):
                return cb
        return None

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        cb = self._layerlock()
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if cb is not None and cb.predictor is not None and model.training:
            latent = cb.predictor.loss(cb.session, inputs)
            cb.session.note_losses(loss.detach(), None if latent is None else latent.detach())
            loss = cb.pixel_weight * loss if cb.pixel_weight != 1.0 else loss
            if latent is not None:
                loss = loss + cb.session.latent_weight * latent
        elif cb is not None and model.training:
            cb.session.note_losses(loss.detach(), None)
        return (loss, outputs) if return_outputs else loss
