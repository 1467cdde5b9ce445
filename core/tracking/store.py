"""The MLflow store: a client bound to one URI, the run's experiment, and carrying out spool
lines against it (what a line that no retry fixes becomes: ``rejected.jsonl``)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from core.errors import LayerLockError, RunNotFoundError, first_line
from core.schema import CHECKPOINT_DIR
from core.tracking.folders import REJECTED_FILE, prune_checkpoints
from core.tracking.spool import MAX_BATCH
from core.tracking.uri import check_uri, resolve_uri, sqlite_path

# MLflow error codes that no retry fixes (a value it refuses, a deleted run): such lines move to
# rejected.jsonl with a warning instead of blocking every line behind them.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}


def client(uri: str):
    """A client bound to ``uri``; never the process-global ``mlflow.set_tracking_uri`` (the
    dashboard serves many visitors from one process)."""
    from mlflow import MlflowClient

    check_uri(uri)
    return MlflowClient(tracking_uri=uri)


def open_client(uri: str):
    """:func:`client`, with any failure to open the store as LayerLockError."""
    try:
        return client(uri)
    except LayerLockError:
        raise
    except Exception as err:  # unsupported scheme, unreachable server, unwritable store
        raise LayerLockError(f"cannot open tracking URI {uri}: {first_line(err)[:300]}") from None


def existing_run(mlflow_client, run_id: str, uri: str):
    """The stored run ``run_id``; RunNotFoundError when the store has none."""
    try:
        return mlflow_client.get_run(run_id)
    except Exception:
        raise RunNotFoundError(f"run not found: {run_id} (tracking URI {uri})") from None


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    db = sqlite_path(uri)
    if db is not None:
        # Keep artifacts beside the sqlite file (not in the current directory of whoever runs).
        artifact_location = (db.resolve().parent / "mlartifacts").as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        return mlflow_client.get_experiment_by_name(name).experiment_id


def log_metrics_to_run(run_id: str, metrics: dict[str, float], step: int, uri: str | None = None) -> None:
    """Write ``metrics`` at ``step`` straight into the existing run ``run_id``: no spool, no
    owner, its status unchanged (an evaluation of a finished run). Raises RunNotFoundError."""
    from mlflow.entities import Metric

    uri = resolve_uri(uri)
    mlflow_client = open_client(uri)
    existing_run(mlflow_client, run_id, uri)
    now = int(time.time() * 1000)
    rows = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
    for i in range(0, len(rows), MAX_BATCH):
        mlflow_client.log_batch(run_id, metrics=rows[i : i + MAX_BATCH], synchronous=True)


def send(mlflow_client, run_id: str, folder: Path, ops: list[dict[str, Any]]) -> None:
    """Carry out one unit of spool lines against the store (raises what MLflow raises)."""
    from mlflow.entities import Metric

    kind = ops[0]["op"]
    if kind == "metrics":
        metrics = [Metric(k, float(v), int(ts), int(step)) for op in ops for k, v, ts, step in op["m"]]
        mlflow_client.log_batch(run_id, metrics=metrics, synchronous=True)
    elif kind == "artifact":
        path = Path(ops[0]["path"])
        if not path.is_file():
            raise FileNotFoundError(f"{path} is gone")
        mlflow_client.log_artifact(run_id, str(path), ops[0].get("dir"))
        if ops[0].get("dir") == CHECKPOINT_DIR:
            prune_checkpoints(folder, f"{CHECKPOINT_DIR}/{path.name}")
    elif kind == "tag":
        mlflow_client.set_tag(run_id, ops[0]["key"], ops[0]["value"])
    elif kind == "status":
        mlflow_client.set_terminated(run_id, status=ops[0]["status"])
    else:
        raise ValueError(f"unknown spool line {ops[0]!r}")


def permanent(err: BaseException) -> bool:
    """Whether no retry can make the store take the line that raised ``err``."""
    return isinstance(err, (FileNotFoundError, ValueError)) or getattr(err, "error_code", None) in PERMANENT_ERRORS


def reject(folder: Path, ops: list[dict[str, Any]], err: BaseException) -> None:
    with open(folder / REJECTED_FILE, "a") as f:
        for op in ops:
            f.write(json.dumps({**op, "error": first_line(err)[:300]}) + "\n")
    print(
        f"warning: the tracking store refused a {ops[0]['op']} line ({first_line(err)[:200]}); "
        f"kept in {folder / REJECTED_FILE}",
        file=sys.stderr,
    )


class _QuietWhileSpooled(logging.Filter):
    """MLflow logs a store error with its traceback, urllib3 every retry; while the spool keeps
    the line and says so once, those are noise on the trainer's stderr."""

    NOISE = ("SQLAlchemy database error", "Retrying (")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def quiet_store_errors() -> None:
    for name in ("mlflow.store.db.utils", "urllib3.connectionpool"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietWhileSpooled) for f in logger.filters):
            logger.addFilter(_QuietWhileSpooled())
