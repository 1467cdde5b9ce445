"""``freeze-test``: the paper's definition of convergence, run as child runs of a baseline.

From the baseline's checkpoint at step T, freeze blocks 0..L-1 and train to the end; if the
final loss stays close to the baseline's, blocks 0..L-1 had converged by step T.
"""

from __future__ import annotations

import argparse
import sys

from core.errors import LayerLockError


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LayerLockError(f"--{name} expects comma-separated integers, got '{text}'") from None
    if not values:
        raise LayerLockError(f"--{name} is empty")
    return values


def run_freeze_test(baseline: str, steps: list[int], blocks: list[int], tracking_uri: str | None = None,
                    progress: bool = True) -> list[str]:
    """Train one child run per (T, L); returns their run ids."""
    from core.config import config_from_dict
    from core.train import load_run_checkpoint, train

    final = load_run_checkpoint(baseline, tracking_uri=tracking_uri)
    cfg = config_from_dict(final["config"], f"run {baseline}")
    depth, total = cfg.model.depth, cfg.train.steps
    for L in blocks:
        if not 1 <= L <= depth - 1:
            raise LayerLockError(f"--blocks {L}: must be between 1 and {depth - 1} (model.depth={depth})")
    for T in steps:
        if not 0 <= T < total:
            raise LayerLockError(f"--steps {T}: must be within the baseline's run (0..{total - 1})")
    states = {T: load_run_checkpoint(baseline, step=T, tracking_uri=tracking_uri) for T in steps}
    children = []
    for T in steps:
        for L in blocks:
            child = cfg.model_copy(deep=True)
            child.freeze.schedule = [{"step": T, "frozen": L}]
            child.probe.enabled = False               # only the final loss matters here
            child.tracking.run_name = f"freeze_test T={T} L={L}"
            child = config_from_dict(child.model_dump(mode="json"), "freeze-test child")
            tags = {"layerlock.method": "freeze_test", "layerlock.parent": baseline, "mlflow.parentRunId": baseline,
                    "layerlock.freeze_test.step": str(T), "layerlock.freeze_test.blocks": str(L)}
            result = train(child, tracking_uri=tracking_uri, tags=tags, init_state=states[T], progress=progress)
            children.append(result.run_id)
            print(f"T={T} L={L}: final loss {result.final_loss:.4f} ({result.run_id})", file=sys.stderr)
    return children


def cmd_freeze_test(args: argparse.Namespace) -> int:
    steps, blocks = _int_list(args.steps, "steps"), _int_list(args.blocks, "blocks")
    run_freeze_test(args.baseline, steps, blocks, args.tracking_uri)
    from analysis.compare import freeze_test_grid

    grid = freeze_test_grid(args.baseline, uri=args.tracking_uri, tol=args.tol)
    print("final-loss ratio (child / baseline), rows L = frozen blocks, columns T = step:", file=sys.stderr)
    print(grid.ratio.round(4).to_string(), file=sys.stderr)
    print("largest converged prefix per step T: "
          + ", ".join(f"T={t}: {k}" for t, k in grid.max_converged_prefix().items()), file=sys.stderr)
    print(args.baseline)
    return 0


def register(sub, add_tracking) -> None:
    p = sub.add_parser("freeze-test", help="the paper's convergence test: freeze blocks 0..L-1 at step T")
    p.add_argument("--baseline", required=True, metavar="RUN_ID", help="an unfrozen run with checkpoints at T")
    p.add_argument("--steps", required=True, help="comma-separated steps T (checkpoint steps of the baseline)")
    p.add_argument("--blocks", required=True, help="comma-separated prefix lengths L")
    p.add_argument("--tol", type=float, default=0.02, help="converged if child loss <= (1 + tol) * baseline")
    add_tracking(p)
    p.set_defaults(func=cmd_freeze_test)
