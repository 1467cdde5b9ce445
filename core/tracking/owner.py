"""One trainer per run: the ``layerlock.owner`` / ``layerlock.heartbeat`` tags (across machines)
and the ``owner.lock`` flock of the run's local folder (on this machine)."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from core.errors import LayerLockError
from core.schema import TAG_HEARTBEAT, TAG_OWNER
from core.tracking.folders import LOCK_FILE

HEARTBEAT_S = 30.0  # the owner's heartbeat tag is refreshed this often
STALE_S = 120.0  # a heartbeat older than this means the owner is gone


def owner_tags() -> dict[str, str]:
    """This process as a run's owner: ``layerlock.owner`` = ``HOST pid PID`` and a heartbeat
    (unix seconds) that the sender refreshes every HEARTBEAT_S."""
    return {TAG_OWNER: f"{socket.gethostname()} pid {os.getpid()}", TAG_HEARTBEAT: f"{time.time():.0f}"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_owner(run) -> None:
    """Refuse (LayerLockError) to train a RUNNING run whose owner is alive: its heartbeat is
    younger than STALE_S and, on this host, its pid still exists. Stale or dead owners, and runs
    that are not RUNNING (finished, killed, failed), may be resumed."""
    tags = run.data.tags
    owner, beat = tags.get(TAG_OWNER), tags.get(TAG_HEARTBEAT)
    if run.info.status != "RUNNING" or not owner or not beat:
        return
    try:
        age = time.time() - float(beat)
    except ValueError:
        return
    if age > STALE_S:
        return
    host, _, pid = owner.partition(" pid ")
    if host == socket.gethostname() and (not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid))):
        return
    raise LayerLockError(
        f"run {run.info.run_id} is being trained by {owner} (heartbeat less than {STALE_S:.0f} s "
        "old); resume it once that process has stopped"
    )


def lock_folder(folder: Path, run_id: str) -> int:
    """Lock ``owner.lock`` for this process (released when it exits, also when killed); a
    second process on this machine is refused with LayerLockError."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LayerLockError(
            f"run {run_id} is being trained by another process on this machine (pid {holder}); "
            "resume it once that process has stopped"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd
