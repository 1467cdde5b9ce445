"""The :class:`Tracker`: a started (or resumed) MLflow run, logged through its local folder and
write-ahead spool; :func:`open_writer`, the tracker of a run of your own training loop."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from core.errors import LayerLockError, first_line
from core.schema import METHOD_OWN_LOOP, TAG_FAILURE, TAG_METHOD
from core.tracking import store
from core.tracking.folders import FILES_DIR, META_FILE, SPOOL_FILE, atomic_write, local_dir, remove_if_done
from core.tracking.owner import check_owner, lock_folder, owner_tags
from core.tracking.reader import RunReader
from core.tracking.spool import MAX_BATCH, Spool
from core.tracking.sync import push_spool
from core.tracking.uri import absolute_uri, resolve_uri

DEFAULT_EXPERIMENT = "layerlock"
SUBMIT_INTERVAL_S = 2.0  # one spool line (and one store call) per this many seconds at most
END_WAIT_S = 60.0  # at the end of a run: how long to wait for an away store before leaving it to sync


class Tracker:
    """A started (or resumed) MLflow run: a :class:`core.tracking.Writer` that logs through the
    run's local folder and spool, sent by the run's sender (``core.tracking.sender``).

    ``run_id`` None: a new run in ``experiment`` (``created`` is True). ``run_id`` given: take
    that run over (resume): the owner check, the local lock, what the last trainer left in the
    spool is sent, then the steps the store holds are read (metrics at those steps are dropped,
    per key, so a recomputed step appears exactly once). ``with Tracker(...)``: finished on
    leaving, FAILED (with the error as reason) on an exception."""

    stores = True

    def __init__(
        self,
        *,
        uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        # The module that starts a process of its own (``python -m core.tracking.sender``), imported
        # here rather than with the package (its docstring says why).
        from core.tracking import sender

        self.uri = resolve_uri(uri)
        self.run_id: str | None = run_id
        self.created = run_id is None
        self.folder: Path | None = None
        self._spool: Spool | None = None
        self._sender: sender.SenderThread | sender.SenderProcess | None = None
        self._lock_fd: int | None = None
        self._pending: list[list] = []
        self._last_step: dict[str, int] = {}
        self._last_submit = time.monotonic()
        sender.sender_kind()  # a bad LAYERLOCK_SENDER fails before a run is created
        self.client = store.open_client(self.uri)
        if run_id is not None:
            run = store.existing_run(self.client, run_id, self.uri)
            check_owner(run)  # a live trainer elsewhere: refused before anything changes
            self._open_folder(run_id)
            try:
                self._take_over(run_id)
            except BaseException:
                self.close()
                raise
        else:
            try:
                exp_id = store.experiment_id(self.client, experiment, self.uri)
            except Exception as err:  # an unwritable store
                raise LayerLockError(f"cannot open tracking URI {self.uri}: {first_line(err)[:300]}") from None
            run = self.client.create_run(exp_id, run_name=run_name, tags={**(tags or {}), **owner_tags()})
            self.run_id = run.info.run_id
            self._open_folder(self.run_id)
        store.quiet_store_errors()
        self._sender = sender.start_sender(self.client, self.uri, self.run_id, self.folder, self._spool)

    def _take_over(self, run_id: str) -> None:
        """Resume: own the run, send what the last trainer left, then note the steps stored.
        The status stays as it is until the caller has loaded a checkpoint (mark_running), so a
        resume that fails leaves a finished run FINISHED."""
        for key, value in owner_tags().items():
            self.client.set_tag(run_id, key, value)
        push_spool(self.client, run_id, self.folder)  # before counting steps: they may be in it
        # Per key, the last step already stored: those steps are not logged again.
        for key in self.client.get_run(run_id).data.metrics:
            hist = self.client.get_metric_history(run_id, key)
            self._last_step[key] = max(m.step for m in hist)

    def _open_folder(self, run_id: str) -> None:
        self.folder = local_dir(run_id)
        self._lock_fd = lock_folder(self.folder, run_id)
        for stale in self.folder.glob("*/.*.tmp"):  # half-written by a killed trainer: never published
            stale.unlink(missing_ok=True)
        atomic_write(
            self.folder / META_FILE,
            lambda f: f.write(json.dumps({"run_id": run_id, "tracking_uri": absolute_uri(self.uri)}).encode()),
        )
        self._spool = Spool(self.folder)

    def reader(self) -> RunReader:
        """This run's stored and local files, to read (a resume's checkpoint and probe features)."""
        return RunReader(self.client, self.run_id, self.folder)

    def mark_running(self) -> None:
        """A resumed run is RUNNING again (called once its checkpoint has loaded)."""
        self.client.update_run(self.run_id, status="RUNNING")

    # -- metrics -----------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics for ``step``; they go out at the next :meth:`submit` (non-blocking)."""
        now = int(time.time() * 1000)  # kept with the metric: a second send of it is a no-op
        for key, value in metrics.items():
            if step <= self._last_step.get(key, -1):
                continue
            self._pending.append([key, float(value), now, int(step)])

    def submit(self, force: bool = False) -> None:
        """Hand queued metrics on in lines of <= 1000 (non-blocking); without ``force``, only once
        ``SUBMIT_INTERVAL_S`` has passed or a full batch is waiting."""
        if not self._pending:
            return
        if not force and len(self._pending) < MAX_BATCH and time.monotonic() - self._last_submit < SUBMIT_INTERVAL_S:
            return
        self._last_submit = time.monotonic()
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), MAX_BATCH):
            self._put({"op": "metrics", "m": pending[i : i + MAX_BATCH]})

    def _put(self, op: dict[str, Any]) -> None:
        """Into the spool, for the sender."""
        self._spool.append(op)
        self._sender.wake.set()

    def make_durable(self) -> None:
        """Everything logged so far is on disk (fsynced): called before a checkpoint is published,
        so no checkpoint ever exists whose metrics could be lost."""
        self.submit(force=True)
        if self._spool is not None:
            self._spool.fsync()

    def flush(self, limit_s: float | None = None) -> bool:
        """Wait until everything logged is in the store; while the store is away, for at most
        ``limit_s`` (END_WAIT_S) seconds. Returns whether everything was sent."""
        sender = self._sender
        if sender is None:
            return True
        self.submit(force=True)
        limit_s = END_WAIT_S if limit_s is None else limit_s
        started = time.monotonic()
        sender.wake.set()
        while not sender.caught_up():
            away = sender.away_since
            if not sender.is_alive() or (away is not None and time.monotonic() - max(away, started) > limit_s):
                return False
            time.sleep(0.05)
        return True

    # -- params, tags, artifacts -------------------------------------------------------------
    def set_tags(self, tags: dict[str, str]) -> None:
        if not tags:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        """Synchronous: a new run logs them right after the store answered its creation."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100], synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload ``path`` in the background: the file must stay until sent."""
        self._put({"op": "artifact", "path": str(Path(path).resolve()), "dir": artifact_path})

    def log_file(self, name: str, write: Callable[[IO[bytes]], None]) -> Path:
        """Store the artifact ``name`` written by ``write(file)``: published in the run's local
        folder (returned), uploaded later."""
        parent = str(Path(name).parent) if Path(name).parent != Path(".") else None
        p = self.folder / FILES_DIR / name
        atomic_write(p, write)
        self.log_artifact(p, parent)
        return p

    def log_text(self, text: str, name: str) -> None:
        self.log_file(name, lambda f: f.write(text.encode()))

    def log_json(self, obj: Any, name: str) -> None:
        self.log_text(json.dumps(obj, indent=2), name)

    # -- end -----------------------------------------------------------------------------------
    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``status`` (through the spool, after everything logged before it).
        After :meth:`close` (the run let go), nothing."""
        if self._spool is None:
            return
        self.submit(force=True)
        self._put({"op": "status", "status": status})
        self._close(status)

    def fail(self, reason: str) -> None:
        """Keep what was logged, record why, mark the run FAILED. After :meth:`close`, nothing."""
        if self._spool is None:
            return
        self.submit(force=True)
        self._put({"op": "tag", "key": TAG_FAILURE, "value": reason[:4000]})
        self._put({"op": "status", "status": "FAILED"})
        self._close("FAILED")

    def _close(self, status: str) -> None:
        sent = self.flush()
        self.close()
        if not sent:
            print(
                f"warning: tracking store {self.uri} still does not answer: what run {self.run_id} logged last "
                f"(and its {status} status) waits in {self.folder / SPOOL_FILE}; send it with "
                f"`python -m experiments sync {self.run_id}`",
                file=sys.stderr,
            )
        else:
            remove_if_done(self.folder, status)

    def close(self) -> None:
        """Stop the sender and let go of the run (what is unsent stays in the spool)."""
        if self._sender is not None:
            self._sender.stop()
            self._sender = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:
            self.finish()
        else:
            self.fail(f"{kind.__name__}: {error}")


def open_writer(
    run: Any = None,
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Tracker:
    """The tracker of a run of your own training loop, tagged ``layerlock.method=own_loop``
    unless ``tags`` say otherwise (and with ``tags``).

    ``run``: an MLflow run id, or an MLflow run (``mlflow.start_run()``), to log into; None: the
    active fluent run if there is one, else a new run in ``experiment`` at ``tracking_uri``
    (``run_name``). Ending the run is the caller's: ``with open_writer(...) as writer:``, or
    ``writer.finish()``; a run of someone else's (the active run) is theirs to end."""
    tags = {TAG_METHOD: METHOD_OWN_LOOP, **(tags or {})}
    if run is None:
        import mlflow

        active = mlflow.active_run()
        if active is None:
            return Tracker(uri=tracking_uri, experiment=experiment, run_name=run_name, tags=tags)
        run, tracking_uri = active, tracking_uri or mlflow.get_tracking_uri()
    run_id = run if isinstance(run, str) else getattr(getattr(run, "info", None), "run_id", None)
    if not run_id:
        raise LayerLockError(f"run must be an MLflow run id, an MLflow run or None; got {type(run).__name__}")
    tracker = Tracker(uri=tracking_uri, run_id=run_id)
    tracker.set_tags(tags)
    return tracker
