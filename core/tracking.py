"""MLflow run logging: one run per training job, batched and non-blocking.

Metrics go through MLflow's asynchronous batch logging (``log_batch(synchronous=False)``) in
chunks of at most 1000 (the ``log_batch`` limit), so the training step never waits on the
store. Queued metrics are handed over at most every ``SUBMIT_INTERVAL_S`` seconds: each
``log_batch`` call has a fixed cost (a store transaction, run checks) that, paid every log
step, showed up in step time on a 2-core machine. ``flush()`` waits for everything queued;
it runs at every checkpoint, at the end and on failure.

On resume, metrics at steps that the store already holds are dropped (per key), so a step
recomputed after a crash appears exactly once in the history.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from core.errors import LayerLockError, RunNotFoundError, first_line
from core.schema import TAG_FAILURE

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_BATCH = 1000
SUBMIT_INTERVAL_S = 2.0


def resolve_uri(uri: str | None = None) -> str:
    """Flag, else ``MLFLOW_TRACKING_URI``, else the embedded sqlite store in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def sqlite_path(uri: str) -> Path | None:
    """The file behind a ``sqlite:///`` URI (relative ``sqlite:///x.db``, absolute
    ``sqlite:////abs/x.db``; a ``?query`` is dropped), else None (other stores, ``:memory:``).

    The one parser of sqlite URIs (the trainer, ``analysis.io``, the dashboard).
    """
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


# MLflow's own HTTP defaults (7 retries with exponential back-off, 120 s per request) keep a
# command waiting minutes on a server that is not there; these apply unless the user set them.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
CONNECT_TIMEOUT_S = 5.0
KNOWN_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def check_uri(uri: str) -> None:
    """Bad tracking URIs fail at once with LayerLockError: an unknown scheme, a sqlite URI without
    a file, an ``http(s)://`` server that does not answer a TCP connect within CONNECT_TIMEOUT_S
    (instead of minutes of MLflow retries). For http(s), MLflow's HTTP retries and timeouts are
    bounded (HTTP_ENV_DEFAULTS) unless the user set them."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if "://" in uri and parts.scheme.split("+")[0] not in KNOWN_SCHEMES:
        raise LayerLockError(f"tracking URI {uri}: unsupported scheme '{parts.scheme}' "
                             f"(use sqlite:///FILE.db, http(s)://HOST:PORT or postgresql://...)")
    if parts.scheme == "sqlite" and not uri.removeprefix("sqlite:///").split("?", 1)[0]:
        raise LayerLockError(f"tracking URI {uri}: no database file (sqlite:///FILE.db, or sqlite:////ABS/FILE.db)")
    if parts.scheme not in ("http", "https"):
        return
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:   # a port that is not a number or out of range
        raise LayerLockError(f"tracking URI {uri}: {err}") from None
    if not host:
        raise LayerLockError(f"tracking URI {uri}: no host")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise LayerLockError(f"tracking server {uri} does not answer ({reason})") from None


def _client(uri: str):
    """A client bound to ``uri``; never the process-global ``mlflow.set_tracking_uri`` (the
    dashboard serves many visitors from one process)."""
    from mlflow import MlflowClient

    check_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    db = sqlite_path(uri)
    if db is not None:
        # Keep artifacts beside the sqlite file (not in the current directory of whoever runs).
        artifact_location = (db.resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


class Tracker:
    """A started (or resumed) MLflow run. ``enabled=False`` makes every call a no-op (non-zero ranks)."""

    def __init__(self, *, uri: str | None = None, experiment: str = "layerlock", run_id: str | None = None,
                 run_name: str | None = None, tags: dict[str, str] | None = None, enabled: bool = True,
                 read_only: bool = False) -> None:
        """``run_id`` given: resume that run (or, with ``read_only``, just attach to read its artifacts)."""
        self.enabled = enabled
        self.uri = resolve_uri(uri)
        self.run_id: str | None = run_id
        self._pending: list = []
        self._ops: list = []
        self._last_step: dict[str, int] = {}
        self._last_submit = time.monotonic()
        if not enabled:
            return
        try:
            self.client = _client(self.uri)
            if run_id is None:
                exp_id = _experiment_id(self.client, experiment, self.uri)
        except LayerLockError:
            raise
        except Exception as err:   # unsupported scheme, unreachable server, unwritable store
            raise LayerLockError(f"cannot open tracking URI {self.uri}: {first_line(err)[:300]}") from None
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except Exception:
                raise RunNotFoundError(f"run not found: {run_id} (tracking URI {self.uri})") from None
            if read_only:
                return
            # The status stays as it is until the caller has loaded a checkpoint (mark_running),
            # so a resume that fails leaves a finished run FINISHED.
            # Per key, the last step already stored: those steps are not logged again.
            for key in run.data.metrics:
                hist = self.client.get_metric_history(run_id, key)
                self._last_step[key] = max(m.step for m in hist)
        else:
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags or {})
            self.run_id = run.info.run_id

    def mark_running(self) -> None:
        """A resumed run is RUNNING again (called once its checkpoint has loaded)."""
        if self.enabled and self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")

    # -- metrics -----------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics for ``step``; sent at the next :meth:`submit` (non-blocking)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self._last_step.get(key, -1):
                continue
            self._pending.append(Metric(key, float(value), now, int(step)))

    def submit(self, force: bool = False) -> None:
        """Hand queued metrics to MLflow's async logger in batches of <= 1000 (non-blocking);
        without ``force``, only once ``SUBMIT_INTERVAL_S`` has passed or a full batch is waiting."""
        if not self.enabled or not self._pending:
            return
        if not force and len(self._pending) < MAX_BATCH and time.monotonic() - self._last_submit < SUBMIT_INTERVAL_S:
            return
        self._last_submit = time.monotonic()
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), MAX_BATCH):
            op = self.client.log_batch(self.run_id, metrics=pending[i:i + MAX_BATCH], synchronous=False)
            if op is not None:
                self._ops.append(op)

    def flush(self) -> None:
        """Block until everything queued is stored."""
        if not self.enabled:
            return
        self.submit(force=True)
        for op in self._ops:
            op.wait()
        self._ops.clear()

    # -- params, tags, artifacts -------------------------------------------------------------
    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / Path(name).name
            p.write_text(text)
            self.log_artifact(p, str(Path(name).parent) if Path(name).parent != Path(".") else None)

    def log_json(self, obj: Any, name: str) -> None:
        self.log_text(json.dumps(obj, indent=2), name)

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        return Path(self.client.download_artifacts(self.run_id, artifact_path, str(dst)))

    def list_artifacts(self, path: str | None = None) -> list[str]:
        if not self.enabled:
            return []
        try:
            return [f.path for f in self.client.list_artifacts(self.run_id, path)]
        except Exception:
            return []

    # -- end -----------------------------------------------------------------------------------
    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self.flush()
        self.client.set_terminated(self.run_id, status=status)

    def fail(self, reason: str) -> None:
        """Keep what was logged, record why, mark the run FAILED."""
        if not self.enabled:
            return
        try:
            self.flush()
        finally:
            self.client.set_tag(self.run_id, TAG_FAILURE, reason[:4000])
            self.client.set_terminated(self.run_id, status="FAILED")
