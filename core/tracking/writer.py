"""Where a run's logging goes: the :class:`Writer` interface, which :class:`core.tracking.Tracker`
implements for an MLflow run, and :class:`NullWriter`, which logs nothing (the trainer's
non-zero ranks, benchmarks without tracking, a monitor run only for its numbers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable


@runtime_checkable
class Writer(Protocol):
    """What the trainer and :class:`core.monitor.LayerMonitor` log through.

    ``run_id``: the run's id (None: no run). ``folder``: the run's local folder, where files are
    published before they are uploaded (None: none). ``stores``: whether anything logged is kept;
    callers skip work whose only product is logged (serialising probe features, checkpoints)."""

    run_id: str | None
    folder: Path | None
    stores: bool

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics at ``step`` (sent at the next :meth:`submit`)."""

    def submit(self, force: bool = False) -> None:
        """Hand queued metrics on (non-blocking)."""

    def make_durable(self) -> None:
        """Everything logged so far is on disk."""

    def flush(self, limit_s: float | None = None) -> bool:
        """Wait until everything logged is stored; whether it all was."""

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_file(self, name: str, write: Callable[[IO[bytes]], None]) -> Path | None:
        """Store the artifact ``name`` that ``write(file)`` writes; its local copy, if any."""

    def log_text(self, text: str, name: str) -> None: ...

    def log_json(self, obj: Any, name: str) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...

    def fail(self, reason: str) -> None: ...

    def close(self) -> None: ...


class NullWriter:
    """A :class:`Writer` that logs nothing: every call returns at once, nothing is kept."""

    run_id: str | None = None
    folder: Path | None = None
    stores = False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def submit(self, force: bool = False) -> None:
        pass

    def make_durable(self) -> None:
        pass

    def flush(self, limit_s: float | None = None) -> bool:
        return True

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_file(self, name: str, write: Callable[[IO[bytes]], None]) -> Path | None:
        return None

    def log_text(self, text: str, name: str) -> None:
        pass

    def log_json(self, obj: Any, name: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def fail(self, reason: str) -> None:
        pass

    def close(self) -> None:
        pass
