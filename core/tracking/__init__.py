"""MLflow run logging that loses nothing and never holds training up.

A run that trains keeps a local folder, :func:`local_dir` (``$LAYERLOCK_RUNS_DIR/<run_id>``,
else ``runs/<run_id>`` in the working directory). While the run lives it is the source of truth:

    run.json        the run id and the tracking URI it logs to
    owner.lock      locked (flock) by the process that trains the run
    spool.jsonl     the outbox: one JSON line per metric batch, artifact upload, tag or status
    checkpoints/    step_NNNNNN.pt, published atomically (:func:`atomic_write`); the newest two stay
    probe/          step_NNNNNN.pt, the features of one probe each
    files/          small artifacts (config.yaml, flop_model.json, layer_metrics.parquet, ...)

**Write-ahead spool.** The trainer appends what it logs to ``spool.jsonl`` (a buffered write:
a killed process loses nothing the kernel has) and a sender sends the lines to the store in
order: a process of its own (``python -m core.tracking.sender``), so that MLflow's store calls
never hold the training loop's interpreter lock, or a thread with ``LAYERLOCK_SENDER=thread``.
When the store does not answer — after MLflow's bounded HTTP retries
(``uri.HTTP_ENV_DEFAULTS``, about 15 s for a refused connection) or sqlite's busy timeout — the
line stays in the spool, a warning says so once, and the sender tries again every
``sender.PROBE_INTERVAL_S``; once the store answers, everything that waited goes out in order.
Training never waits for the store, only the end of a run does (``tracker.END_WAIT_S`` at most
while the store is away); what is still in the spool then is pushed by ``python -m experiments
sync`` or by the next ``--resume``. Sending a line twice is harmless: a metric keeps the
timestamp it got when logged and MLflow's SQL store drops a metric whose key, step, timestamp
and value it already holds; uploads and tags overwrite. The spool is emptied whenever
everything in it was sent.

**Resume** (:class:`Tracker` with ``run_id``): first the owner check (``owner.check_owner``: a run
whose heartbeat is fresh belongs to a live trainer and is refused), then the local lock, then
what the last trainer left in the spool is sent, and only then the steps the store holds are
read: metrics at those steps are dropped (per key), so a recomputed step appears exactly once.

**Writers and readers.** The trainer and :class:`core.monitor.LayerMonitor` log through a
:class:`Writer`: a :class:`Tracker` (an MLflow run; :func:`open_writer` for a run of your own
loop) or a :class:`NullWriter` (nothing logged). Reading a stored run's files is a
:class:`RunReader`'s, which writes nothing; :func:`log_metrics_to_run` adds metrics to a
finished run without taking it over.

The modules, one job each: ``uri`` (which store, and a fast failure for a bad one), ``folders``
(the local folder, atomic files, checkpoints), ``owner`` (one trainer per run), ``spool``,
``store`` (the MLflow client and carrying out spool lines), ``sender``, ``sync``, ``reader``,
``writer`` and ``tracker``.
"""

from core.tracking.folders import RUNS_ENV, SPOOL_FILE, atomic_write, local_checkpoints, local_dir, runs_root
from core.tracking.owner import STALE_S
from core.tracking.reader import RunReader
from core.tracking.store import log_metrics_to_run
from core.tracking.sync import runs_with_spool, sync_run
from core.tracking.tracker import Tracker, open_writer
from core.tracking.uri import DEFAULT_URI, absolute_uri, check_uri, resolve_uri, sqlite_path
from core.tracking.writer import NullWriter, Writer

__all__ = [
    "DEFAULT_URI",
    "RUNS_ENV",
    "SPOOL_FILE",
    "STALE_S",
    "NullWriter",
    "RunReader",
    "Tracker",
    "Writer",
    "absolute_uri",
    "atomic_write",
    "check_uri",
    "local_checkpoints",
    "local_dir",
    "log_metrics_to_run",
    "open_writer",
    "resolve_uri",
    "runs_root",
    "runs_with_spool",
    "sqlite_path",
    "sync_run",
]
