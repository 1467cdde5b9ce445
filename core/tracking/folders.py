"""A run's local folder (``$LAYERLOCK_RUNS_DIR/<run_id>``, else ``runs/<run_id>``): its layout,
atomic publishing of files in it, its checkpoints and their pruning, and its removal."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

from core.schema import CHECKPOINT_DIR, checkpoint_step

RUNS_ENV = "LAYERLOCK_RUNS_DIR"
META_FILE = "run.json"  # the run id and the tracking URI it logs to
LOCK_FILE = "owner.lock"
SPOOL_FILE = "spool.jsonl"
REJECTED_FILE = "rejected.jsonl"  # lines the store refused for good (kept, never dropped)
FILES_DIR = "files"
KEEP_CHECKPOINTS = 2  # local checkpoints kept once uploaded: the newest and its fallback


def runs_root() -> Path:
    """Where runs keep their local folders: ``$LAYERLOCK_RUNS_DIR``, else ``runs/`` here."""
    return Path(os.environ.get(RUNS_ENV) or "runs").resolve()


def local_dir(run_id: str) -> Path:
    """A run's local folder (it may not exist: a finished and fully sent run removes it)."""
    return runs_root() / run_id


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Publish ``path`` whole or not at all: ``write`` fills a hidden temporary file beside it,
    which is fsynced and then renamed over ``path`` (the folder fsynced too). A kill at any
    moment leaves the previous file or the complete new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def local_checkpoints(folder: Path | None) -> dict[str, Path]:
    """``{"checkpoints/step_NNNNNN.pt": file}`` of the complete checkpoints in a local folder."""
    if folder is None or not (folder / CHECKPOINT_DIR).is_dir():
        return {}
    return {f"{CHECKPOINT_DIR}/{p.name}": p for p in (folder / CHECKPOINT_DIR).glob("step_*.pt")}


def prune_checkpoints(folder: Path, uploaded: str) -> None:
    """After ``uploaded`` reached the store: keep it, KEEP_CHECKPOINTS - 1 older ones and every
    newer one (not yet uploaded); older local copies go (the store has them)."""
    step = checkpoint_step(uploaded)
    older = sorted((p for name, p in local_checkpoints(folder).items() if checkpoint_step(name) < step), reverse=True)
    for p in older[KEEP_CHECKPOINTS - 1 :]:
        p.unlink(missing_ok=True)


def remove_if_done(folder: Path, status: str) -> bool:
    """Delete a FINISHED run's local folder once its spool is empty (the store has it all)."""
    spool = folder / SPOOL_FILE
    if status != "FINISHED" or (spool.exists() and spool.stat().st_size):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True
