"""LayerLock for PyTorch Lightning 2.x: a ``Callback`` (``lightning.pytorch``; ``pytorch_lightning``
works the same, see :func:`callback_for`).

::

    ll = LayerLockCallback(schedule, probe_batch=x_val, probe_forward=lambda x: module.vit.forward_features(x),
                           latent=True)
    trainer = lightning.Trainer(callbacks=[ll], logger=MLFlowLogger(...))

    # in the LightningModule's training_step, LayerLock's latent loss on top of the model's own:
    loss = ll.add_latent(pixel_loss, lambda: self.vit.forward_features(x), latent_pred, mask_idx)

The callback attaches a :class:`core.monitor.LayerMonitor` to the module's blocks (found on the
module or one of its direct children: timm ``blocks``, torchvision ``encoder.layers``, HF
``encoder.layer``; or given) and applies the schedule at every batch through the trainer's own
optimizer. Gradient norms are read in ``on_before_optimizer_step`` (before Lightning clips
them). Where the trainer logs with Lightning's ``MLFlowLogger``, the monitor logs into that run.
Its state (frozen prefix, probe history, step times) is the callback's ``state_dict`` in
Lightning's checkpoint, so ``trainer.fit(..., ckpt_path=...)`` resumes a frozen stage as it was.
docs/integrations.md.
"""

from __future__ import annotations

from typing import Any

import torch

from core.errors import LayerLockError
from core.integrations import LayerLockSession, check_version

SUPPORTED = ("2.0", "3")  # Lightning 2.x


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:  # pragma: no cover - the older package name
        try:
            import pytorch_lightning as pl
        except ImportError as err:
            raise LayerLockError(
                "core.integrations.lightning needs Lightning: pip install 'layerlock-lab[lightning]'"
            ) from err
    return pl


def callback_for(pl: Any) -> type:
    """The callback class for one Lightning package (``lightning.pytorch`` or ``pytorch_lightning``):
    each has its own ``Callback`` base class, and a trainer accepts only its own."""

    class LayerLockCallback(pl.Callback):
        """Monitor, schedule and latent loss in a Lightning ``Trainer``; keywords as in
        :class:`core.integrations.LayerLockSession` (blocks, stem, latent, probe_batch,
        probe_forward, every, train_step, run, tracking_uri, ...)."""

        def __init__(self, schedule: Any = None, **session: Any) -> None:
            check_version("lightning", pl.__version__, SUPPORTED)
            self.schedule, self._kwargs = schedule, session
            self.session: LayerLockSession | None = None
            self._saved: dict | None = None

        @property
        def state_key(self) -> str:
            return "LayerLockCallback"

        def setup(self, trainer, pl_module, stage: str) -> None:
            if self.session is None:  # checks blocks and schedule before any training
                self.session = LayerLockSession(pl_module, self.schedule, **self._kwargs)

        def on_train_start(self, trainer, pl_module) -> None:
            session = self.session
            if session.run is None:
                for logger in trainer.loggers:
                    if type(logger).__name__ == "MLFlowLogger":  # log into the trainer's MLflow run
                        session.run, session.tracking_uri = logger.run_id, logger._tracking_uri
                        break
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            session.start(
                trainer.global_step,
                optimizer,
                total_steps=trainer.max_steps if trainer.max_steps > 0 else None,
                state=self._saved or None,
            )

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.session.begin_step(trainer.global_step, trainer.optimizers[0] if trainer.optimizers else None)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.session.after_backward(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.session.after_step(trainer.global_step - 1, loss)  # global_step counts this update

        def on_train_end(self, trainer, pl_module) -> None:
            self.session.close(trainer.global_step)

        def state_dict(self) -> dict:
            if self.session is None or self.session.monitor is None:
                return dict(self._saved or {})
            return self.session.state_dict()

        def load_state_dict(self, state_dict: dict) -> None:
            self._saved = dict(state_dict) or None

        def add_latent(
            self, loss: torch.Tensor, run_input, predictions: torch.Tensor, mask_idx: torch.Tensor | None = None
        ) -> torch.Tensor:
            """The model's ``loss`` plus LayerLock's latent loss at the schedule's stage
            (:meth:`core.integrations.LayerLockSession.add_latent`)."""
            if self.session is None:
                raise LayerLockError("the LayerLock callback is not set up: pass it to the Trainer's callbacks")
            return self.session.add_latent(loss, run_input, predictions, mask_idx)

        @property
        def run_id(self) -> str | None:
            return self.session.monitor.run_id if self.session and self.session.monitor else None

    return LayerLockCallback


LayerLockCallback = callback_for(_lightning())
