"""Seeds as a first-class idea: one config trained once per seed, the runs sharing one group.

A *group* is "this config minus the seed" (:func:`core.config.group_name`); the trainer tags
every run with it as ``layerlock.group``, so the runs of :func:`train_seeds` (identical configs
but for ``train.seed``) land in one group that ``python -m analysis compare GROUP ...`` and the
dashboard summarise as mean, spread and N, with differences paired on the seed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from core.config import ExperimentConfig, group_name
from core.errors import LayerLockError
from core.schema import TAG_GROUP

if TYPE_CHECKING:  # pragma: no cover - typing only
    from core.train import TrainResult


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``, in the order given.

    Raises LayerLockError for an empty list, an item that is not an integer, or a repeated seed
    (two runs with one seed would be one measurement counted twice).
    """
    items = [item.strip() for item in (text or "").split(",")]
    if not any(items):
        raise LayerLockError("--seeds is empty: give comma-separated integers, e.g. --seeds 0,1,2")
    seeds: list[int] = []
    for item in items:
        try:
            seeds.append(int(item))
        except ValueError:
            raise LayerLockError(f"--seeds expects comma-separated integers, got '{text}' ('{item}')") from None
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise LayerLockError(f"--seeds repeats {', '.join(map(str, repeated))}: each seed gives one run")
    return seeds


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """``cfg`` with ``train.seed = seed`` and, when the config names its run, ``<name>-seed<seed>``."""
    out = cfg.model_copy(deep=True)
    out.train.seed = seed
    if cfg.tracking.run_name:
        out.tracking.run_name = f"{cfg.tracking.run_name}-seed{seed}"
    return out


def train_seeds(
    cfg: ExperimentConfig,
    seeds: Sequence[int],
    *,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    progress: bool = True,
    on_result: Callable[[int, TrainResult], None] | None = None,
) -> list[TrainResult]:
    """Train ``cfg`` once per seed, in order; every run carries the same ``layerlock.group`` tag.

    One overall progress bar over the seeds (position 0) sits above the trainer's per-run bar.
    ``on_result(seed, result)`` is called as each run finishes (the command line prints its id
    then, so the runs already done are known if a later one fails). A run that diverges raises
    (``TrainingDiverged``) and the remaining seeds are not trained.
    """
    from tqdm.auto import tqdm

    from core.train import train

    seeds = list(seeds)
    if not seeds:
        raise LayerLockError("train_seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise LayerLockError(f"train_seeds: repeated seeds in {seeds}")
    # Explicit, although the trainer derives the same tag: a caller's own tags cannot split the group.
    run_tags = {TAG_GROUP: group_name(cfg), **(tags or {})}
    results: list[TrainResult] = []
    bar = tqdm(seeds, desc=f"seeds of {run_tags[TAG_GROUP]}", unit="run", position=0, disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    for seed in bar:
        bar.set_postfix(seed=seed)
        result = train(seed_config(cfg, seed), tracking_uri=tracking_uri, tags=run_tags, progress=progress)
        results.append(result)
        if on_result is not None:
            on_result(seed, result)
    bar.close()
    return results
