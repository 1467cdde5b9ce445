"""``freeze-test``: the paper's definition of convergence, run as child runs of a baseline.

From the baseline's checkpoint at step T, freeze blocks 0..L-1 and train to the end; if the
final loss stays close to the baseline's, blocks 0..L-1 had converged by step T. "Close" is
the tolerance of :mod:`analysis.agreement`: calibrated on the seed spread of the baseline's
final loss when the baseline has a seed group, else ``--tol`` or 0.02.

``--grid`` picks the cells itself (:func:`grid_plan`): up to ``GRID_STEPS`` checkpoint steps
T evenly spread over the baseline's interior checkpoints (every stored one except the final
step) and prefix lengths L = 1, depth/4, depth/2, 3*depth/4 (rounded, within 1..depth-1,
unique): finer at the shallow end, where blocks converge first. Five interior checkpoints
need ``train.checkpoint_every <= train.steps / 6``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from core.errors import LayerLockError
from core.schema import (
    CHECKPOINT_DIR,
    FREEZE_VARIANTS,
    METHOD_FREEZE_TEST,
    MLFLOW_PARENT,
    TAG_FREEZE_BLOCKS,
    TAG_FREEZE_STEP,
    TAG_FREEZE_VARIANT,
    TAG_METHOD,
    TAG_PARENT,
    VARIANT_BLOCK,
    VARIANT_PREFIX,
    VARIANT_PREFIX_NO_STEM,
    VARIANT_STEM,
    checkpoint_step,
)

GRID_STEPS = 5
_CHECKPOINT = re.compile(r"step_(\d+)\.pt$")


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LayerLockError(f"--{name} expects comma-separated integers, got '{text}'") from None
    if not values:
        raise LayerLockError(f"--{name} is empty")
    return values


def grid_blocks(depth: int, shallowest: bool = True) -> list[int]:
    """Prefix lengths for ``--grid``: 1, depth/4, depth/2, 3*depth/4 rounded half up, kept within
    1..depth-1, unique and sorted (depth 8 -> 1, 2, 4, 6; depth 4 -> 1, 2, 3); without
    ``shallowest``, not 1 (a smaller grid: depth 8 -> 2, 4, 6)."""
    if depth < 2:
        raise LayerLockError(f"a freeze test needs model.depth >= 2 (one block must train), got {depth}")
    values = ({1} if shallowest else set()) | {int(depth * f + 0.5) for f in (0.25, 0.5, 0.75)}
    return sorted(v for v in values if 1 <= v <= depth - 1)


def grid_plan(
    checkpoints: Sequence[int], total_steps: int, depth: int, n_steps: int = GRID_STEPS, shallowest: bool = True
) -> tuple[list[int], list[int], str | None]:
    """``(steps, blocks, note)`` for ``--grid``. ``steps``: up to ``n_steps`` of the interior
    checkpoints (``0 < step < total_steps``), evenly spread and including the first and last;
    ``blocks``: :func:`grid_blocks`; ``note``: why the grid is thinner than asked (None when it is not)."""
    interior = sorted({int(s) for s in checkpoints if 0 < int(s) < total_steps})
    every = total_steps // (n_steps + 1)
    advice = (
        f"train the baseline with train.checkpoint_every <= {every} (steps/{n_steps + 1}) to get >= {n_steps}"
        if every >= 1
        else f"a run of {total_steps} steps has at most {max(total_steps - 1, 0)}"
    )
    if not interior:
        raise LayerLockError(
            f"the baseline has no checkpoint before its final step {total_steps}; {advice} interior checkpoints"
        )
    n = len(interior)
    if n > n_steps:
        picks = sorted({round(i * (n - 1) / max(n_steps - 1, 1)) for i in range(n_steps)})
        steps = [interior[i] for i in picks]
    else:
        steps = interior
    note = None
    if n < n_steps:
        note = (
            f"checkpoints too sparse: the baseline has {n} interior checkpoint(s) "
            f"({', '.join(map(str, interior))}), the grid wants {n_steps}; {advice} interior checkpoints"
        )
    return steps, grid_blocks(depth, shallowest), note


def checkpoint_steps(run_id: str, tracking_uri: str | None = None) -> list[int]:
    """Steps of the checkpoints a run stored (``checkpoints/step_NNNNNN.pt``), ascending."""
    from core.tracking import RunReader

    names = RunReader.open(run_id, tracking_uri).list_artifacts(CHECKPOINT_DIR)
    return sorted(checkpoint_step(n) for n in names if _CHECKPOINT.search(n))


def plan_from_run(
    baseline: str, tracking_uri: str | None = None, n_steps: int = GRID_STEPS, shallowest: bool = True
) -> tuple[list[int], list[int], str | None]:
    """:func:`grid_plan` for a stored baseline (its ``model.depth``/``train.steps`` params)."""
    from analysis import io

    record = io.get_run(baseline, tracking_uri)
    depth, total = record.param_int("model.depth"), record.param_int("train.steps")
    if depth is None or total is None:
        raise LayerLockError(f"run {baseline} lacks the model.depth/train.steps params; pass --steps and --blocks")
    return grid_plan(checkpoint_steps(baseline, tracking_uri), total, depth, n_steps, shallowest)


def variant_set(variant: str, x: int, depth: int):
    """The :class:`core.freezing.FrozenSet` a variant freezes for ``x`` (L for the prefix variants,
    the block i for ``block``, ignored for ``stem``); LayerLockError for an unknown variant or an
    ``x`` outside the model."""
    from core.freezing import FrozenSet

    if variant not in FREEZE_VARIANTS:
        raise LayerLockError(f"--variant {variant}: unknown (one of {', '.join(FREEZE_VARIANTS)})")
    if variant in (VARIANT_PREFIX, VARIANT_PREFIX_NO_STEM):
        if not 1 <= x <= depth - 1:
            raise LayerLockError(f"--blocks {x}: must be between 1 and {depth - 1} (model.depth={depth})")
        return FrozenSet(frozenset(range(x)), variant == VARIANT_PREFIX)
    if variant == VARIANT_BLOCK:
        if not 0 <= x <= depth - 1:
            raise LayerLockError(f"--blocks {x}: a block index must be between 0 and {depth - 1} (model.depth={depth})")
        return FrozenSet(frozenset({x}), False)
    return FrozenSet(frozenset(), True)


def variant_label(variant: str, x: int) -> str:
    """``L=2`` / ``L=2 no-stem`` / ``block 3`` / ``stem``: how a cell's frozen set is named."""
    return {
        VARIANT_PREFIX: f"L={x}",
        VARIANT_PREFIX_NO_STEM: f"L={x} no-stem",
        VARIANT_BLOCK: f"block {x}",
        VARIANT_STEM: "stem",
    }[variant]


def freeze_test_specs(
    baseline: str,
    steps: list[int],
    blocks: list[int],
    tracking_uri: str | None = None,
    variant: str = VARIANT_PREFIX,
) -> list:
    """One :class:`experiments.executor.RunSpec` per (T, x): the baseline's config with the
    variant's frozen set from step T (``prefix``: blocks 0..x-1 and the stem, as a schedule stage;
    the others: ``freeze.only``), branched off its checkpoint at T. ``blocks`` is ignored for
    ``stem``. Raises LayerLockError for a T or x outside the baseline's run, or a T without a checkpoint."""
    from core.config import config_from_dict
    from core.train import load_run_checkpoint
    from experiments.executor import spec_for

    if variant not in FREEZE_VARIANTS:
        raise LayerLockError(f"--variant {variant}: unknown (one of {', '.join(FREEZE_VARIANTS)})")
    final = load_run_checkpoint(baseline, tracking_uri=tracking_uri)
    cfg = config_from_dict(final["config"], f"run {baseline}")
    depth, total = cfg.model.depth, cfg.train.steps
    xs = [0] if variant == VARIANT_STEM else blocks
    sets = {x: variant_set(variant, x, depth) for x in xs}
    stored = checkpoint_steps(baseline, tracking_uri)
    for T in steps:
        if not 0 <= T < total:
            raise LayerLockError(f"--steps {T}: must be within the baseline's run (0..{total - 1})")
        if T not in stored:
            raise LayerLockError(f"run {baseline} has no checkpoint at step {T} (has: {', '.join(map(str, stored))})")
    specs = []
    for T in steps:
        for x in xs:
            child = cfg.model_copy(deep=True)
            if variant == VARIANT_PREFIX:  # today's children, unchanged
                child.freeze.schedule = [{"step": T, "frozen": x}]
            else:
                fs = sets[x]
                child.freeze.schedule = child.freeze.stem = None
                child.freeze.only = {"step": T, "blocks": sorted(fs.blocks), "stem": fs.stem}
            child.probe.enabled = False  # only the final loss matters here
            child.train.time_calibration = 0  # and no schedule is predicted from a child's step times
            name = variant_label(variant, x)
            child.tracking.run_name = f"freeze_test T={T} {name}"
            child = config_from_dict(child.model_dump(mode="json"), "freeze-test child")
            tags = {
                TAG_METHOD: METHOD_FREEZE_TEST,
                TAG_PARENT: baseline,
                MLFLOW_PARENT: baseline,
                TAG_FREEZE_STEP: str(T),
                TAG_FREEZE_BLOCKS: str(x),
            }
            if variant != VARIANT_PREFIX:  # untagged children read as prefix: old run keys stay the same
                tags[TAG_FREEZE_VARIANT] = variant
            specs.append(spec_for(child, f"T={T} {name}", tags, init_from=(baseline, T)))
    return specs


def run_freeze_test(
    baseline: str,
    steps: list[int],
    blocks: list[int],
    tracking_uri: str | None = None,
    progress: bool | None = None,
    variant: str = VARIANT_PREFIX,
    **executor,
) -> list[str]:
    """Train one child run per (T, L) through :func:`experiments.executor.run_specs` (``executor``:
    its ``executor``/``workers``/``ray_address``); returns their run ids. Children that FINISHED
    before are kept; :class:`experiments.executor.RunsFailed` when some do not finish."""
    from experiments.executor import run_specs

    specs = freeze_test_specs(baseline, steps, blocks, tracking_uri, variant)
    results = run_specs(specs, uri=tracking_uri, desc=f"freeze test of {baseline[:8]}", progress=progress, **executor)
    return [r.run_id for r in results]


def cmd_freeze_test(args: argparse.Namespace) -> int:
    from experiments.executor import options

    executor = options(args)  # bad options fail before the store is read
    variant = args.variant
    if variant not in FREEZE_VARIANTS:
        raise LayerLockError(f"--variant {variant}: unknown (one of {', '.join(FREEZE_VARIANTS)})")
    if variant == VARIANT_STEM and args.blocks:
        raise LayerLockError("--variant stem freezes the stem alone: drop --blocks")
    if args.grid:
        if args.steps or args.blocks:
            raise LayerLockError("--grid picks the steps and blocks itself: drop --steps/--blocks (or --grid)")
        steps, blocks, note = plan_from_run(args.baseline, args.tracking_uri)
        if variant == VARIANT_BLOCK:  # single blocks at the same depths: 0, depth/4 - 1, ...
            blocks = sorted({L - 1 for L in blocks})
        if note:
            print(f"warning: {note}", file=sys.stderr)
        name, meaning = _X_NAME[variant].split(" = ", 1)
        cells = meaning if variant == VARIANT_STEM else f"{name} = {', '.join(map(str, blocks))} ({meaning})"
        print(f"grid: T = {', '.join(map(str, steps))}; {cells}", file=sys.stderr)
    else:
        if not (args.steps and (args.blocks or variant == VARIANT_STEM)):
            raise LayerLockError("freeze-test needs --steps and --blocks (--steps alone for --variant stem), or --grid")
        steps = _int_list(args.steps, "steps")
        blocks = [0] if variant == VARIANT_STEM else _int_list(args.blocks, "blocks")
    run_freeze_test(args.baseline, steps, blocks, args.tracking_uri, variant=variant, **executor)
    from analysis import io
    from analysis.agreement import freeze_grid
    from analysis.compare import FINAL_LOSS_PARTS

    runs = io.load_freeze_test(args.baseline, args.tracking_uri, FINAL_LOSS_PARTS)
    grid, tolerance = freeze_grid(runs, tol=args.tol, variant=variant)
    print(tolerance.line(), file=sys.stderr)
    if variant == VARIANT_PREFIX_NO_STEM:
        print("prefix-no-stem is a diagnostic: the stem trains, so nothing of the backward is saved", file=sys.stderr)
    print(
        f"{variant}: final-loss ratio (child / {grid.reference}), rows {_X_NAME[variant]}, columns T = step:",
        file=sys.stderr,
    )
    print(grid.ratio.round(4).to_string(), file=sys.stderr)
    print_savings(args.baseline, variant, blocks, args.tracking_uri)
    if variant == VARIANT_PREFIX:
        print(
            "largest converged prefix per step T: "
            + ", ".join(f"T={t}: {k}" for t, k in grid.max_converged_prefix().items()),
            file=sys.stderr,
        )
    print(args.baseline)
    return 0


def print_savings(baseline: str, variant: str, blocks: list[int], tracking_uri: str | None = None) -> None:
    """One line per cell: the counted FLOP saving of one step with the variant's set frozen
    (``core.flops.variant_saving``), on stderr."""
    from core.config import config_from_dict
    from core.flops import variant_saving
    from core.train import load_run_checkpoint

    cfg = config_from_dict(load_run_checkpoint(baseline, tracking_uri=tracking_uri)["config"], f"run {baseline}")
    for x in [0] if variant == VARIANT_STEM else blocks:
        s = variant_saving(cfg, variant_set(variant, x, cfg.model.depth))
        print(
            f"{variant_label(variant, x)} saves {s['saving']:.1%} of a step's counted FLOPs "
            f"({s['flops_frozen']:.3g} of {s['flops_full']:.3g})",
            file=sys.stderr,
        )


_X_NAME = {
    VARIANT_PREFIX: "L = frozen blocks 0..L-1 with the stem",
    VARIANT_PREFIX_NO_STEM: "L = frozen blocks 0..L-1, stem trains",
    VARIANT_BLOCK: "i = the one frozen block",
    VARIANT_STEM: "0 = the stem alone",
}


def register(sub, add_tracking) -> None:
    from experiments.executor import add_options as add_executor_options

    p = sub.add_parser(
        "freeze-test",
        help="the paper's convergence test: freeze blocks 0..L-1 at step T",
        description="Branch one child run per (T, L) off a baseline's checkpoint at step T with blocks 0..L-1 "
        "frozen to the end, then print the grid of final-loss ratios (child / baseline). "
        f"--grid picks up to {GRID_STEPS} steps T evenly from the baseline's interior checkpoints "
        "(all but the final step) and L = 1, depth/4, depth/2, 3*depth/4; "
        f"{GRID_STEPS} interior checkpoints need train.checkpoint_every <= train.steps/{GRID_STEPS + 1} "
        "in the baseline (with fewer, the grid uses those there are and says so). The tolerance is "
        "calibrated on the seed spread of the baseline's final loss (its layerlock.group runs) "
        "unless --tol is given; without a seed group it is 0.02.",
    )
    p.add_argument("--baseline", required=True, metavar="RUN_ID", help="an unfrozen run with checkpoints at T")
    p.add_argument("--steps", help="comma-separated steps T (checkpoint steps of the baseline)")
    p.add_argument(
        "--blocks",
        help="comma-separated prefix lengths L (prefix, prefix-no-stem) or block indices i (block; one child each)",
    )
    p.add_argument(
        "--variant",
        default=VARIANT_PREFIX,
        metavar="|".join(FREEZE_VARIANTS),
        help="what freezes at T: prefix = blocks 0..L-1 with the stem (default, the paper's test); stem = the "
        "stem alone (patch embedding; the position table is fixed); prefix-no-stem = blocks 0..L-1 with the "
        "stem trainable (a diagnostic: gradients flow through the frozen blocks, nothing is saved); block = "
        "block i alone (the blocks below it and the stem train: only its weight gradients are saved)",
    )
    p.add_argument(
        "--grid",
        action="store_true",
        help=f"pick T (up to {GRID_STEPS} interior checkpoints) and L (4 values) from the baseline; "
        "conflicts with --steps/--blocks",
    )
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help="converged if child loss <= (1 + tol) * baseline (default: calibrated, the relative sd of "
        "the final loss over the baseline's seed group; 0.02 without one)",
    )
    add_executor_options(p)
    add_tracking(p)
    p.set_defaults(func=cmd_freeze_test)
