"""What ``bench monitor`` and ``bench own-freezing`` share about the README example's loop
(``experiments.examples.own_loop``): its default run lengths, a fresh model, its steps' times."""

from __future__ import annotations

import time

DEFAULT_STEPS = {"vit": 300, "video": 200}  # the README example's runs


def fresh(setup, initial: dict) -> None:
    """The setup's model back at its initial weights, nothing frozen."""
    from core.freezing import freeze_prefix

    freeze_prefix(setup.blocks, 0, stem=setup.stem)
    setup.model.load_state_dict(initial)


def step_seconds(setup, steps: int, **kwargs) -> list[float]:
    """Run the example's loop; the seconds of each step (start of one step to the start of the next)."""
    from experiments.examples.own_loop import train

    starts: list[float] = []
    train(setup, steps, on_step=lambda _step: starts.append(time.perf_counter()), **kwargs)
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts, starts[1:])]
