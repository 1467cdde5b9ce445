"""``python -m experiments sync [RUN_ID]``: send what runs left in their local spool.

A trainer sends its own spool while it runs (core/tracking/, "Write-ahead spool"). What is left
— the store was still away when the run ended, or the process was killed — waits in
``runs/<run_id>/spool.jsonl`` (``$LAYERLOCK_RUNS_DIR``) until this command, or the run's next
``--resume``, sends it: metric batches, uploads (checkpoints, probe features, config) and the
final status, in the order they were logged.
"""

from __future__ import annotations

import argparse
import sys

from core.errors import LayerLockError
from core.tracking import RUNS_ENV, check_uri, runs_root, runs_with_spool, sync_run


def cmd_sync(args: argparse.Namespace) -> int:
    if args.tracking_uri:
        check_uri(args.tracking_uri)  # an explicit store that does not answer: one line, now
    if args.run:
        sent, status = sync_run(args.run, args.tracking_uri)
        print(f"run {args.run}: sent {sent} waiting line(s); status {status}", file=sys.stderr)
        return 0
    ids = runs_with_spool()
    if not ids:
        print(f"nothing waiting to be sent under {runs_root()}", file=sys.stderr)
        return 0
    for run_id in ids:
        try:
            sent, status = sync_run(run_id, args.tracking_uri)
        except LayerLockError as err:  # a run still being trained sends its own spool
            print(f"run {run_id}: skipped ({err})", file=sys.stderr)
            continue
        print(f"run {run_id}: sent {sent} waiting line(s); status {status}", file=sys.stderr)
    return 0


def register(sub, add_tracking) -> None:
    p = sub.add_parser(
        "sync", help="send what runs left in their local spool (runs/<run_id>/spool.jsonl) to the tracking store"
    )
    p.add_argument("run", nargs="?", metavar="RUN_ID", help="one run (default: every run with a spool)")
    add_tracking(p)
    p.set_defaults(func=cmd_sync)
    p.epilog = (
        f"Local folders: ${RUNS_ENV}, else ./runs. Each run's lines go to the store it logged to; "
        "--tracking-uri sends them there instead (e.g. a server that moved)."
    )
