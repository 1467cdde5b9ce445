"""What a run left in its spool, sent now: by ``python -m experiments sync`` and by a resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

from core.errors import LayerLockError, first_line
from core.tracking import store
from core.tracking.folders import META_FILE, SPOOL_FILE, local_dir, remove_if_done, runs_root
from core.tracking.owner import lock_folder
from core.tracking.spool import Spool, units
from core.tracking.uri import resolve_uri


def push_spool(client, run_id: str, folder: Path) -> int:
    """Send what a run's spool holds, now, in order (``sync`` and resume); returns the number of
    lines sent. Raises LayerLockError when the store does not take a line (the rest stays)."""
    path = folder / SPOOL_FILE
    if not path.exists() or path.stat().st_size == 0:
        return 0
    spool = Spool(folder)
    sent, offset = 0, 0
    try:
        for end, ops in units(spool.read(0)):
            try:
                store.send(client, run_id, folder, ops)
            except Exception as err:
                if not store.permanent(err):
                    raise LayerLockError(
                        f"run {run_id}: the tracking store did not take the spooled lines "
                        f"({first_line(err)[:200]}); they stay in {path}"
                    ) from None
                store.reject(folder, ops, err)
            sent, offset = sent + len(ops), end
        spool.trim(offset)
    finally:
        spool.close()
    return sent


def sync_run(run_id: str, uri: str | None = None) -> tuple[int, str]:
    """Send what run ``run_id`` left in its local spool (``python -m experiments sync``) to ``uri``,
    else to the store the run was logging to; returns ``(lines sent, run status)``. A FINISHED
    run's folder goes once its spool is empty. Raises RunNotFoundError for an unknown run and
    LayerLockError while a trainer holds the run or when the store does not answer."""
    folder = local_dir(run_id)
    meta = folder / META_FILE
    if uri is None and meta.is_file():
        uri = json.loads(meta.read_text())["tracking_uri"]
    uri = resolve_uri(uri)
    client = store.client(uri)
    store.existing_run(client, run_id, uri)
    if not meta.is_file():
        return 0, client.get_run(run_id).info.status
    fd = lock_folder(folder, run_id)
    try:
        sent = push_spool(client, run_id, folder)
        status = client.get_run(run_id).info.status
    finally:
        os.close(fd)
    remove_if_done(folder, status)
    return sent, status


def runs_with_spool() -> list[str]:
    """Run ids whose local folder still holds unsent lines."""
    root = runs_root()
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if (p / META_FILE).is_file() and (p / SPOOL_FILE).is_file() and (p / SPOOL_FILE).stat().st_size
    )
