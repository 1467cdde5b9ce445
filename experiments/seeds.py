"""Seeds as a first-class idea: one config trained once per seed, the runs sharing one group.

A *group* is "this config minus the seed" (:func:`core.config.group_name`); the trainer tags
every run with it as ``layerlock.group``, so the runs of :func:`train_seeds` (identical configs
but for ``train.seed``) land in one group that ``python -m analysis compare GROUP ...`` and the
dashboard summarise as mean, spread and N, with differences paired on the seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from core.config import ExperimentConfig, group_name
from core.errors import LayerLockError
from core.schema import TAG_GROUP

if TYPE_CHECKING:  # pragma: no cover - typing only
    from experiments.executor import RunResult


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


def seed_specs(cfg: ExperimentConfig, seeds: Sequence[int], tags: dict[str, str] | None = None) -> list:
    """One :class:`experiments.executor.RunSpec` per seed, all tagged with one ``layerlock.group``;
    a run is identified by its tags and its seed."""
    from experiments.executor import spec_for

    seeds = list(seeds)
    if not seeds:
        raise LayerLockError("train_seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise LayerLockError(f"train_seeds: repeated seeds in {seeds}")
    # Explicit, although the trainer derives the same tag: a caller's own tags cannot split the group.
    run_tags = {TAG_GROUP: group_name(cfg), **(tags or {})}
    return [
        spec_for(seed_config(cfg, seed), f"seed {seed}", run_tags, identity={**run_tags, "train.seed": str(seed)})
        for seed in seeds
    ]


def train_seeds(
    cfg: ExperimentConfig,
    seeds: Sequence[int],
    *,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    progress: bool | None = None,
    on_result: Callable[[RunResult], None] | None = None,
    **executor,
) -> list[RunResult]:
    """Train ``cfg`` once per seed through :func:`experiments.executor.run_specs` (``executor``: its
    ``executor``/``workers``/``ray_address``); every run carries the same ``layerlock.group`` tag.

    ``on_result(result)`` is called as each run ends (the command line prints its id then). Seeds
    that FINISHED before are kept; :class:`experiments.executor.RunsFailed` when some do not finish.
    """
    from experiments.executor import run_specs

    specs = seed_specs(cfg, seeds, tags)
    return run_specs(
        specs,
        uri=tracking_uri,
        desc=f"seeds of {specs[0].tags[TAG_GROUP]}",
        progress=progress,
        on_result=on_result,
        **executor,
    )
