"""A run's write-ahead spool, ``spool.jsonl``: what the trainer logs, one JSON line per metric
batch, artifact upload, tag or status, until the sender has sent it in order."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.tracking.folders import SPOOL_FILE

MAX_BATCH = 1000  # MLflow's log_batch limit


class Spool:
    """A run's ``spool.jsonl``: lines appended by the trainer, read and emptied by the sender.

    The sender may be another process: appends, reads and the emptying hold an exclusive
    ``flock`` on the file (and a thread lock within a process), so a line is never cut by a trim.
    ``written``: bytes the file held at open plus every byte appended through this object since
    (what a sender has to have sent before it has caught up); ``reader``: the sender's side,
    which leaves a partial tail to the appending side."""

    def __init__(self, folder: Path, reader: bool = False) -> None:
        self.path = folder / SPOOL_FILE
        self._lock = threading.Lock()
        if not reader:
            self._drop_partial_tail()
        self._out = open(self.path, "ab")  # noqa: SIM115 - kept open for the run's life
        self.written = self._out.tell()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            fcntl.flock(self._out.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._out.fileno(), fcntl.LOCK_UN)

    def _drop_partial_tail(self) -> None:
        """A process killed inside a write can leave half a line; it never reached the store
        and would garble the next line, so it goes."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, op: dict[str, Any]) -> None:
        line = (json.dumps(op, separators=(",", ":")) + "\n").encode()
        with self._locked():
            self._out.write(line)
            self._out.flush()  # in the kernel now: a killed process loses nothing
            self.written += len(line)

    def fsync(self) -> None:
        """Durable also against a machine crash (before a checkpoint is published)."""
        with self._lock:
            self._out.flush()
            os.fsync(self._out.fileno())

    def size(self) -> int:
        with self._lock:
            return self.path.stat().st_size

    def count_from_here(self) -> None:
        """``written`` := what the file holds now (a sender that starts reading it at 0)."""
        with self._locked():
            self.written = self.path.stat().st_size

    def read(self, offset: int) -> list[tuple[int, dict[str, Any]]]:
        """``(end offset, op)`` of every complete line from ``offset`` on."""
        with self._locked():
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        out, pos = [], offset
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break
            pos += len(raw)
            try:
                out.append((pos, json.loads(raw)))
            except ValueError:
                print(f"warning: {self.path}: an unreadable line was skipped", file=sys.stderr)
        return out

    def trim(self, offset: int) -> bool:
        """Empty the file when everything up to its end (``offset``) has been sent."""
        with self._locked():
            if self.path.stat().st_size != offset:
                return False
            self._out.truncate(0)
            return True

    def close(self) -> None:
        with self._lock:
            self._out.close()


def units(entries: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, list[dict[str, Any]]]]:
    """Consecutive metric lines merged up to MAX_BATCH metrics (fewer store calls when a
    backlog goes out); every other line alone. ``(end offset, ops)``."""
    out: list[tuple[int, list[dict[str, Any]]]] = []
    for end, op in entries:
        if (
            op.get("op") == "metrics"
            and out
            and out[-1][1][-1].get("op") == "metrics"
            and sum(len(o["m"]) for o in out[-1][1]) + len(op["m"]) <= MAX_BATCH
        ):
            out[-1] = (end, [*out[-1][1], op])
        else:
            out.append((end, [op]))
    return out
