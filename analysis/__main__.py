"""Command line: ``python -m analysis {convergence,schedule,compare,freeze-grid,agreement,freeze-test-report} ...``.

Library code raises :class:`core.errors.LayerLockError`; this is the only place that turns it
into one ``error: ...`` line on stderr and exit code 2 (docs/architecture.md, "Errors"). Heavy imports
(mlflow, scipy) happen inside the commands, so ``--help`` and argument errors stay instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from core.errors import LayerLockError, first_line
from core.schema import FREEZE_VARIANTS, STEM_POLICIES, VARIANT_PREFIX


def _jsonable(x: Any) -> Any:
    """NaN/NA -> None, numpy scalars -> Python, recursively (json.dumps emits invalid NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):  # numpy scalar
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    try:
        import pandas as pd

        if pd.isna(x):
            return None
        if isinstance(x, pd.Timestamp):
            return x.isoformat()
    except (TypeError, ValueError):
        pass
    return str(x)


def _dump(obj: Any) -> str:
    return json.dumps(_jsonable(obj), indent=2)


# ----------------------------------------------------------------------------- commands


def cmd_convergence(args: argparse.Namespace) -> None:
    from analysis import io
    from analysis.convergence import convergence_report
    from core.schema import metric_help

    layer_df = io.load_layer_metrics(args.run, args.tracking_uri)
    report = convergence_report(layer_df, args.method, args.threshold, args.patience, run_id=args.run)
    report["metric_help"] = metric_help(report["metric"])  # what the rule's indicator measures
    if args.json:
        print(_dump(report))
        return
    print(
        f"run {report['run_id']}  method {report['method']}  metric {report['metric']}  "
        f"threshold {report['threshold']:g}" + (f"  patience {report['patience']}" if report["patience"] else "")
    )
    if report["metric_help"]:
        print(f"{report['metric']}: {report['metric_help']}")
    print(f"{'block':>5}  {'converged_step':>14}")
    for row in report["blocks"]:
        step = row["converged_step"]
        print(f"{row['block']:>5}  {'never' if step is None else step:>14}")
    rho, tau = report["spearman_rho"], report["kendall_tau"]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:+.3f}"

    print(
        f"{report['n_converged']}/{report['n_blocks']} blocks converged by step {report['last_step']}; "
        f"depth order: spearman rho {fmt(rho)}, kendall tau {fmt(tau)}"
    )


def cmd_schedule(args: argparse.Namespace) -> None:
    from analysis import io
    from analysis.schedule import derive_run_schedule, schedule_parts

    run = io.load_run(args.run, args.tracking_uri, schedule_parts(args.method))
    schedule = derive_run_schedule(
        run,
        args.method,
        args.threshold,
        args.patience,
        total_steps=args.total_steps,
        margin=args.margin,
        max_frozen=args.max_frozen,
        quantize=args.quantize,
        stem=args.stem,
    )
    text = _dump(schedule)
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        except FileExistsError as err:  # mkdir met a file where a folder should be
            raise LayerLockError(f"cannot write --out {out}: {err.filename} is not a directory") from None
        except OSError as err:
            raise LayerLockError(f"cannot write --out {out}: {err.strerror or err}") from None
    print(text)
    flop, wall = schedule["predicted_flop_saving"], schedule["predicted_time_saving"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    basis = {"time_model": "measured step times", "flops": "FLOPs"}.get(schedule["predicted_time_basis"], "-")
    print(
        f"predicted saving: FLOPs {pct(flop)}, wall time {pct(wall)} (from {basis}: "
        f"{schedule['prediction']['time_model']})",
        file=sys.stderr,
    )
    if schedule.get("predicted_saving_basis") == "estimate":  # last: what the user must not miss
        print(f"note: the predicted saving is an ESTIMATE: {schedule['prediction']['flop_model']}", file=sys.stderr)


def cmd_compare(args: argparse.Namespace) -> None:
    from analysis import io
    from analysis.compare import COMPARE_PARTS, compare_groups, prediction_lines
    from analysis.stats import INTERVAL_NAME, summary_table

    specs = io.resolve_groups(args.runs, args.tracking_uri)
    runs = io.load_runs([r for spec in specs for r in spec.run_ids], args.tracking_uri, COMPARE_PARTS)
    result = compare_groups(specs, runs, baseline=args.baseline)
    for spec in result.specs:
        if spec.skipped:
            print(
                f"group {spec.name}: left out {len(spec.skipped)} unfinished run(s): {', '.join(spec.skipped)}",
                file=sys.stderr,
            )
    if args.json:
        print(_dump(result.to_dict()))
        return
    import pandas as pd

    print(f"baseline: {result.baseline} (savings and paired differences are measured against it)")
    print("\ngroups: mean ± sd (N runs)")
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 40):
        print(summary_table(result.summary).T.to_string())
        if not result.paired.empty:
            print(f"\npaired differences (group - baseline, pairs matched on train.seed, {INTERVAL_NAME}):")

            def num(v) -> str:
                return "n/a" if v is None or pd.isna(v) else f"{v:+.4g}"

            shown = pd.DataFrame(
                {
                    "group": result.paired["group_b"],
                    "metric": result.paired["metric"],
                    "mean diff": [num(v) for v in result.paired["mean_diff"]],
                    "95% t interval": [
                        "n/a" if pd.isna(lo) else f"[{num(lo)}, {num(hi)}]"
                        for lo, hi in zip(result.paired["ci_low"], result.paired["ci_high"], strict=True)
                    ],
                    "N pairs": result.paired["n"],
                    "verdict": result.paired["verdict"],
                }
            )
            print(shown.to_string(index=False))
        predicted = prediction_lines(result.runs)
        if predicted:
            print(f"\nsavings of scheduled runs: predicted before they ran, and measured against {result.baseline}:")
            print("\n".join(predicted))
        print("\nruns:")
        with pd.option_context("display.float_format", "{:.4g}".format):
            print(result.runs.set_index("run_id").T.to_string())


def cmd_freeze_grid(args: argparse.Namespace) -> None:
    from analysis import io
    from analysis.agreement import freeze_grid
    from analysis.compare import FINAL_LOSS_PARTS

    grid, tolerance = freeze_grid(
        io.load_freeze_test(args.parent, args.tracking_uri, FINAL_LOSS_PARTS), tol=args.tol, variant=args.variant
    )
    if args.json:
        print(tolerance.line(), file=sys.stderr)
        print(_dump({**grid.to_dict(), "tolerance": tolerance.to_dict()}))
        return
    import pandas as pd

    print(tolerance.line())
    print(f"{grid.reference} final loss {grid.baseline_final_loss:.4f}; converged if ratio <= {1 + grid.tol:.4f}")
    rows = {"prefix": "frozen blocks L", "block": "the frozen block i", "stem": "0 = the stem alone"}
    print(f"{grid.variant}: final loss / {grid.reference} (rows: {rows.get(grid.variant, 'L')}, columns: step T)")
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
        print(grid.ratio.to_string())
    print(
        "largest converged prefix per T: " + ", ".join(f"T={t}: L={v}" for t, v in grid.max_converged_prefix().items())
    )


def cmd_agreement(args: argparse.Namespace) -> None:
    from analysis import io
    from analysis.agreement import AGREEMENT_BASELINE_PARTS, agreement_report, format_report
    from analysis.compare import FINAL_LOSS_PARTS

    runs = io.load_freeze_test(args.run, args.tracking_uri, FINAL_LOSS_PARTS, baseline_parts=AGREEMENT_BASELINE_PARTS)
    report = agreement_report(runs, tol=args.tol)
    if args.json:
        from analysis.agreement import ties_lines

        print(report["tolerance"]["line"], file=sys.stderr)
        for line in ties_lines(report["ties"]):
            print(line, file=sys.stderr)
        print(_dump(report))
        return
    print(format_report(report))


def cmd_freeze_test_report(args: argparse.Namespace) -> None:
    from analysis import io
    from analysis.agreement import (
        VARIANT_SAVINGS,
        calibrated_tolerance,
        format_variant_costs,
        seed_noise,
        variant_costs,
    )
    from analysis.compare import FINAL_LOSS_PARTS

    ids = [r for r in args.runs.split(",") if r.strip()]
    if not ids:
        raise LayerLockError("--runs is empty: give the baselines' run ids, comma-separated (one per seed)")
    tests = [io.load_freeze_test(r.strip(), args.tracking_uri, FINAL_LOSS_PARTS) for r in ids]
    costs = variant_costs(tests)
    noise = seed_noise(tests)
    tolerance = calibrated_tolerance(tests[0])
    if args.json:
        print(tolerance.line(), file=sys.stderr)
        print(_dump({"tolerance": tolerance.to_dict(), "seed_noise": noise[0], "cells": costs.to_dict("records")}))
        return
    print(tolerance.line())
    print(format_variant_costs(costs, noise, VARIANT_SAVINGS))


# ----------------------------------------------------------------------------- parser


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def build_parser(prog: str = "python -m analysis") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Analyse logged LayerLock Lab runs.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convergence", parents=[common], help="per-block convergence steps and the order statistic")
    conv.add_argument("--run", required=True, help="MLflow run id")
    conv.add_argument("--method", choices=("posthoc", "online", "gradnorm"), default="posthoc")
    conv.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="posthoc: cka_final (0.95); online: cka_prev (0.99); gradnorm: relative change eps (0.05)",
    )
    conv.add_argument("--patience", type=_non_negative_int, default=None, help="online/gradnorm streak length (3)")
    conv.add_argument("--json", action="store_true", help="print the report as JSON")
    conv.set_defaults(func=cmd_convergence)

    sched = sub.add_parser("schedule", parents=[common], help="derive a freezing schedule from a run")
    sched.add_argument("--run", required=True, help="MLflow run id to derive from")
    sched.add_argument("--out", default=None, help="write the schedule JSON here (also printed)")
    sched.add_argument("--method", choices=("posthoc", "online", "gradnorm"), default="posthoc")
    sched.add_argument("--threshold", type=float, default=None)
    sched.add_argument("--patience", type=_non_negative_int, default=None)
    sched.add_argument("--margin", type=_non_negative_int, default=0, help="safety margin in steps (0)")
    sched.add_argument("--max-frozen", type=_non_negative_int, default=None, help="cap on frozen blocks (n_blocks-1)")
    sched.add_argument("--quantize", type=_non_negative_int, default=None, help="round stage steps up to a multiple")
    sched.add_argument(
        "--stem",
        choices=STEM_POLICIES,
        default=None,
        help="when the stem (patch embedding) freezes: with block 0 (default), at the last stage, or never "
        "(then the frozen blocks save only their weight gradients; the predicted saving counts that)",
    )
    sched.add_argument(
        "--total-steps", type=_non_negative_int, default=None, help="horizon (default: the run's train.steps)"
    )
    sched.set_defaults(func=cmd_schedule)

    comp = sub.add_parser(
        "compare", parents=[common], help="compare groups of seeds or runs (loss, FLOPs, wall time, probes, collapse)"
    )
    comp.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_ID_OR_GROUP",
        help="a run id (a group of one) or a layerlock.group name (its finished runs)",
    )
    comp.add_argument(
        "--baseline",
        default=None,
        metavar="GROUP",
        help="group that savings and paired differences are measured against (default: the first)",
    )
    comp.add_argument("--json", action="store_true", help='print {"baseline", "groups", "paired", "runs"} as JSON')
    comp.set_defaults(func=cmd_compare)

    grid = sub.add_parser("freeze-grid", parents=[common], help="freeze-test grid of a parent run")
    grid.add_argument("--parent", required=True, help="baseline run id whose children are freeze tests")
    grid.add_argument(
        "--tol",
        type=float,
        default=None,
        help="converged if final loss <= (1+tol) x baseline (default: calibrated, the relative sd "
        "of the final loss over the baseline's seed group; 0.02 without a group)",
    )
    grid.add_argument(
        "--variant",
        choices=FREEZE_VARIANTS,
        default=VARIANT_PREFIX,
        help="which freeze-test variant's children (default prefix; children without a variant tag are prefix)",
    )
    grid.add_argument("--json", action="store_true")
    grid.set_defaults(func=cmd_freeze_grid)

    agree = sub.add_parser(
        "agreement", parents=[common], help="score the cheap convergence rules against a baseline's freeze test"
    )
    agree.add_argument("--run", required=True, help="baseline run id with freeze-test children")
    agree.add_argument(
        "--tol",
        type=float,
        default=None,
        help="freeze-test tolerance (default: calibrated on the baseline's seed group, else 0.02)",
    )
    agree.add_argument("--json", action="store_true", help="print the report as JSON")
    agree.set_defaults(func=cmd_agreement)

    rep = sub.add_parser(
        "freeze-test-report",
        parents=[common],
        help="each freeze-test cell's cost (every variant) with its 95%% interval over seeds",
        description="Per (variant, cell, T): child final loss / its own baseline's - 1, averaged over the "
        "baselines given (one per seed), with a Student-t 95%% interval over them; children without a "
        "variant tag are the prefix test.",
    )
    rep.add_argument(
        "--runs", required=True, metavar="RUN_ID,...", help="the baselines (one per seed), comma-separated"
    )
    rep.add_argument("--json", action="store_true", help="print the cells as JSON")
    rep.set_defaults(func=cmd_freeze_test_report)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m analysis") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        args.func(args)
    except LayerLockError as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and cut short: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
