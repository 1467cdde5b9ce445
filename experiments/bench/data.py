"""``bench data``: seconds to build a batch of 32 procedural clips, per dataset (median of repeats).
Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

import statistics

from experiments.bench.timing import timed


def bench_data(repeats: int, batch: int = 32) -> dict[str, float]:
    """Median seconds to build ``batch`` procedural clips, per dataset (after one warm-up batch)."""
    from core.config import DataConfig
    from core.data import build_dataset, get_batch

    out = {}
    for name in ("moving_digits", "photo_pans"):
        ds = build_dataset(DataConfig(name=name, frames=8, size=32, train_clips=64, val_clips=16))
        get_batch(ds, range(4))
        out[name] = statistics.median(timed(lambda ds=ds: get_batch(ds, range(batch)))[0] for _ in range(repeats))
    return out
