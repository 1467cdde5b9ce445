"""``python tests/pretrain_with_faults.py [--slow S] [--kill-in-checkpoint STEP] PRETRAIN_ARGS...``

``python -m experiments pretrain`` with faults a test needs at a known moment:

- ``--slow S``: every training step sleeps S seconds first, so an outage a test causes lands in
  the middle of the run (sleeping costs no CPU on a shared machine);
- ``--kill-in-checkpoint STEP``: the process SIGKILLs itself halfway through writing the
  checkpoint of STEP (half of its bytes are on disk).
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import torch

import core.train as core_train
from experiments.cli import main


def slow_steps(seconds: float) -> None:
    real = core_train._Run.update

    def slowed(self, step, *args, **kwargs):
        if kwargs.get("log_now", True):  # training steps, not the time calibration's
            time.sleep(seconds)
        return real(self, step, *args, **kwargs)

    core_train._Run.update = slowed


def kill_in_checkpoint(step: int) -> None:
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj and obj.get("step") == step:
            import io

            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *args, **kwargs)

    core_train.torch.save = save


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--kill-in-checkpoint", type=int, default=None)
    ours, rest = parser.parse_known_args()
    if ours.slow:
        slow_steps(ours.slow)
    if ours.kill_in_checkpoint is not None:
        kill_in_checkpoint(ours.kill_in_checkpoint)
    raise SystemExit(main(["pretrain", *rest]))
