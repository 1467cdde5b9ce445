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
order: a process of its own (:class:`_SenderProcess`), so that MLflow's store calls never hold
the training loop's interpreter lock, or a thread with ``LAYERLOCK_SENDER=thread``. When the
store does not answer — after MLflow's bounded HTTP retries
(:data:`HTTP_ENV_DEFAULTS`, about 15 s for a refused connection) or sqlite's busy timeout — the
line stays in the spool, a warning says so once, and the sender tries again every
``PROBE_INTERVAL_S``; once the store answers, everything that waited goes out in order. Training
never waits for the store, only the end of a run does (``END_WAIT_S`` at most while the store
is away); what is still in the spool then is pushed by ``python -m experiments sync`` or by the
next ``--resume``. Sending a line twice is harmless: a metric keeps the timestamp it got when
logged and MLflow's SQL store drops a metric whose key, step, timestamp and value it already
holds; uploads and tags overwrite. The spool is emptied whenever everything in it was sent.

**Resume** (:class:`Tracker` with ``run_id``): first the owner check (:func:`check_owner`: a run
whose heartbeat is fresh belongs to a live trainer and is refused), then the local lock, then
what the last trainer left in the spool is sent, and only then the steps the store holds are
read: metrics at those steps are dropped (per key), so a recomputed step appears exactly once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from core.errors import LayerLockError, RunNotFoundError, first_line
from core.schema import CHECKPOINT_DIR, TAG_FAILURE, TAG_HEARTBEAT, TAG_OWNER, checkpoint_step

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_BATCH = 1000   # MLflow's log_batch limit
SUBMIT_INTERVAL_S = 2.0   # one spool line (and one store call) per this many seconds at most

RUNS_ENV = "LAYERLOCK_RUNS_DIR"
SPOOL_FILE = "spool.jsonl"
REJECTED_FILE = "rejected.jsonl"   # lines the store refused for good (kept, never dropped)
META_FILE = "run.json"
LOCK_FILE = "owner.lock"
FILES_DIR = "files"
KEEP_CHECKPOINTS = 2   # local checkpoints kept once uploaded: the newest and its fallback
PROBE_INTERVAL_S = 2.0   # while the store is away: how often the sender tries again
HEARTBEAT_S = 30.0   # the owner's heartbeat tag is refreshed this often
STALE_S = 120.0   # a heartbeat older than this means the owner is gone
END_WAIT_S = 60.0   # at the end of a run: how long to wait for an away store before leaving it to sync
# MLflow error codes that no retry fixes (a value it refuses, a deleted run): such lines move to
# rejected.jsonl with a warning instead of blocking every line behind them.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}


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


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative sqlite file made absolute (the same store from any directory)."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    _, sep, query = uri.partition("?")
    return f"sqlite:///{path.resolve()}{sep}{query}"


# MLflow's own HTTP defaults (7 retries with exponential back-off from 2 s, 120 s per request)
# keep a command waiting minutes on a server that is not there; these apply unless the user set
# them. A refused connection then costs about 15 s (back-off 1, 2, 4, 8 s) before the trainer's
# spool takes over.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
CONNECT_TIMEOUT_S = 5.0
KNOWN_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306}


def _address(uri: str) -> tuple[str, int] | None:
    """``(host, port)`` of a networked store (http(s), postgresql, mysql), else None."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.hostname, parts.port or _DEFAULT_PORTS[scheme]


def _answers(uri: str, timeout: float = 2.0) -> bool:
    """Whether a networked store accepts a TCP connection (always True for files)."""
    try:
        address = _address(uri)
    except ValueError:
        return False
    if address is None:
        return True
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError:
        return False
    return True


def check_uri(uri: str) -> None:
    """Bad tracking URIs fail at once with LayerLockError: an unknown scheme, a sqlite URI without
    a file, an ``http(s)://`` server that does not answer a TCP connect within CONNECT_TIMEOUT_S
    (instead of minutes of MLflow retries). For http(s), MLflow's HTTP retries and timeouts are
    bounded (HTTP_ENV_DEFAULTS) unless the user set them."""
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


# ----------------------------------------------------------------------------- local folder, files

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


def _prune_checkpoints(folder: Path, uploaded: str) -> None:
    """After ``uploaded`` reached the store: keep it, KEEP_CHECKPOINTS - 1 older ones and every
    newer one (not yet uploaded); older local copies go (the store has them)."""
    step = checkpoint_step(uploaded)
    older = sorted((p for name, p in local_checkpoints(folder).items() if checkpoint_step(name) < step),
                   reverse=True)
    for p in older[KEEP_CHECKPOINTS - 1:]:
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- ownership

def owner_tags() -> dict[str, str]:
    """This process as a run's owner: ``layerlock.owner`` = ``HOST pid PID`` and a heartbeat
    (unix seconds) that the sender refreshes every HEARTBEAT_S."""
    return {TAG_OWNER: f"{socket.gethostname()} pid {os.getpid()}", TAG_HEARTBEAT: f"{time.time():.0f}"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process
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
    raise LayerLockError(f"run {run.info.run_id} is being trained by {owner} (heartbeat less than {STALE_S:.0f} s "
                         "old); resume it once that process has stopped")


def _lock_folder(folder: Path, run_id: str) -> int:
    """Lock ``owner.lock`` for this process (released when it exits, also when killed); a
    second process on this machine is refused with LayerLockError."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LayerLockError(f"run {run_id} is being trained by another process on this machine (pid {holder}); "
                             "resume it once that process has stopped") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


# ----------------------------------------------------------------------------- the spool

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
        self._out = open(self.path, "ab")   # noqa: SIM115 - kept open for the run's life
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
            self._out.flush()   # in the kernel now: a killed process loses nothing
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


def _units(entries: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, list[dict[str, Any]]]]:
    """Consecutive metric lines merged up to MAX_BATCH metrics (fewer store calls when a
    backlog goes out); every other line alone. ``(end offset, ops)``."""
    units: list[tuple[int, list[dict[str, Any]]]] = []
    for end, op in entries:
        if (op.get("op") == "metrics" and units and units[-1][1][-1].get("op") == "metrics"
                and sum(len(o["m"]) for o in units[-1][1]) + len(op["m"]) <= MAX_BATCH):
            units[-1] = (end, [*units[-1][1], op])
        else:
            units.append((end, [op]))
    return units


def _send(client, run_id: str, folder: Path, ops: list[dict[str, Any]]) -> None:
    """Carry out one unit of spool lines against the store (raises what MLflow raises)."""
    from mlflow.entities import Metric

    kind = ops[0]["op"]
    if kind == "metrics":
        metrics = [Metric(k, float(v), int(ts), int(step)) for op in ops for k, v, ts, step in op["m"]]
        client.log_batch(run_id, metrics=metrics, synchronous=True)
    elif kind == "artifact":
        path = Path(ops[0]["path"])
        if not path.is_file():
            raise FileNotFoundError(f"{path} is gone")
        client.log_artifact(run_id, str(path), ops[0].get("dir"))
        if ops[0].get("dir") == CHECKPOINT_DIR:
            _prune_checkpoints(folder, f"{CHECKPOINT_DIR}/{path.name}")
    elif kind == "tag":
        client.set_tag(run_id, ops[0]["key"], ops[0]["value"])
    elif kind == "status":
        client.set_terminated(run_id, status=ops[0]["status"])
    else:
        raise ValueError(f"unknown spool line {ops[0]!r}")


def _permanent(err: BaseException) -> bool:
    return isinstance(err, (FileNotFoundError, ValueError)) or getattr(err, "error_code", None) in PERMANENT_ERRORS


def _reject(folder: Path, ops: list[dict[str, Any]], err: BaseException) -> None:
    with open(folder / REJECTED_FILE, "a") as f:
        for op in ops:
            f.write(json.dumps({**op, "error": first_line(err)[:300]}) + "\n")
    print(f"warning: the tracking store refused a {ops[0]['op']} line ({first_line(err)[:200]}); "
          f"kept in {folder / REJECTED_FILE}", file=sys.stderr)


class _QuietWhileSpooled(logging.Filter):
    """MLflow logs a store error with its traceback, urllib3 every retry; while the spool keeps
    the line and says so once, those are noise on the trainer's stderr."""

    NOISE = ("SQLAlchemy database error", "Retrying (")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def _quiet_store_errors() -> None:
    for name in ("mlflow.store.db.utils", "urllib3.connectionpool"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietWhileSpooled) for f in logger.filters):
            logger.addFilter(_QuietWhileSpooled())


class _Sender(threading.Thread):
    """Sends a run's spool in order; while the store is away, tries again every PROBE_INTERVAL_S.

    A thread of the trainer (``LAYERLOCK_SENDER=thread``), or the main loop of the sender
    process (:class:`_SenderProcess`), which passes ``report``: called with ``(bytes sent in
    all, away_since)`` whenever either changes."""

    def __init__(self, client, uri: str, run_id: str, folder: Path, spool: Spool,
                 report: Callable[[int, float | None], None] | None = None) -> None:
        super().__init__(name=f"layerlock-sender-{run_id[:8]}", daemon=True)
        self.client, self.uri, self.run_id, self.folder, self.spool = client, uri, run_id, folder, spool
        self.offset = 0
        self.sent = 0   # bytes of spool lines sent (or rejected), over every trim
        self.report = report
        self.wake = threading.Event()
        self.stopping = False
        self.away_since: float | None = None   # monotonic time the store stopped answering
        self.waited = 0   # lines sent since the store came back
        self._last_beat = time.monotonic()

    def run(self) -> None:
        while not self.stopping:
            self.wake.wait(PROBE_INTERVAL_S if self.away_since is not None else HEARTBEAT_S / 3)
            self.wake.clear()
            try:
                self.drain()
                self.heartbeat()
            except Exception as err:   # never die silently: the trainer waits on this thread
                self.went_away(err)

    def caught_up(self) -> bool:
        return self.offset == self.spool.size()

    def drain(self) -> None:
        if self.away_since is not None and not _answers(self.uri):
            return   # a refused connection: no need to read the spool or wait for MLflow's retries
        if self.client is None:   # the sender process opens the store itself (it may be locked or away)
            try:
                self.client = _client(self.uri)
            except Exception as err:
                self.went_away(err, time.monotonic())
                return
        for end, ops in _units(self.spool.read(self.offset)):
            tried = time.monotonic()
            try:
                _send(self.client, self.run_id, self.folder, ops)
            except Exception as err:
                if not _permanent(err):
                    self.went_away(err, tried)
                    return
                _reject(self.folder, ops, err)
            self.sent += end - self.offset
            self.offset = end
            if self.away_since is not None:
                self.came_back()
            self._report()
        if self.spool.trim(self.offset):
            self.offset = 0

    def _report(self) -> None:
        if self.report is not None:
            self.report(self.sent, self.away_since)

    def heartbeat(self) -> None:
        if self.client is None or self.away_since is not None or time.monotonic() - self._last_beat < HEARTBEAT_S:
            return
        self._last_beat = time.monotonic()
        try:
            self.client.set_tag(self.run_id, TAG_HEARTBEAT, f"{time.time():.0f}")
        except Exception:
            pass   # the next line sent finds out whether the store is away

    def went_away(self, err: BaseException, since: float | None = None) -> None:
        if self.away_since is None:
            self.away_since = since or time.monotonic()
            print(f"warning: tracking store {self.uri} does not answer ({first_line(err)[:160]}); training goes "
                  f"on, what it logs waits in {self.spool.path} and is sent when the store answers", file=sys.stderr)
            self._report()

    def came_back(self) -> None:
        gone = time.monotonic() - (self.away_since or time.monotonic())
        self.away_since = None
        print(f"tracking store {self.uri} answers again ({gone:.0f} s after the first line it did not take): "
              "sending what waited", file=sys.stderr)

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        self.wake.set()
        self.join(timeout)


SENDER_ENV = "LAYERLOCK_SENDER"   # "process" (default) or "thread"


class _Wake:
    """The sender process's wake-up: a byte down its stdin (never blocks: a full pipe already
    holds a wake-up, and a gone process is found out by ``is_alive``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def set(self) -> None:
        try:
            os.write(self.fd, b"w")
        except OSError:   # a full pipe (BlockingIOError) or a gone process (BrokenPipeError)
            pass


class _SenderProcess:
    """The sender (:class:`_Sender`) in a process of its own, so that MLflow's store calls (tens
    of milliseconds of Python per batch with the sqlite store) never take the interpreter lock
    from the training loop. The same interface as the thread: ``wake.set()``, ``caught_up()``,
    ``away_since``, ``is_alive()``, ``stop()``.

    The child reads the spool (both sides ``flock`` it), reports after every line it sent how
    many bytes it has sent in all and whether the store is away, ignores SIGINT and SIGTERM (the
    trainer decides when to stop: a Ctrl-C must not cut the run's last lines) and exits after a
    last drain when :meth:`stop` sends ``q``, or at once when its stdin closes without one: the
    trainer died (what is left then waits in the spool for ``sync`` or ``--resume``, as after a
    kill)."""

    def __init__(self, uri: str, run_id: str, folder: Path, spool: Spool) -> None:
        self.spool = spool
        self.sent = 0
        self.away_since: float | None = None
        spool.count_from_here()
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from core.tracking import _sender_main; _sender_main()", uri, run_id,
             str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=root)
        os.set_blocking(self.proc.stdin.fileno(), False)
        self.wake = _Wake(self.proc.stdin.fileno())
        self._reader = threading.Thread(target=self._read, name=f"layerlock-sender-{run_id[:8]}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            sent, _, away = line.decode(errors="replace").partition(" ")
            try:
                self.sent, self.away_since = int(sent), (None if away.strip() == "-" else float(away))
            except ValueError:
                print(f"warning: the tracking sender said {line[:200]!r}", file=sys.stderr)

    def caught_up(self) -> bool:
        return self.sent >= self.spool.written

    def is_alive(self) -> bool:
        return self.proc.poll() is None and self._reader.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + 2.0
        while self.is_alive():   # "q" must arrive: stdin closing without it means the trainer died
            try:
                os.write(self.wake.fd, b"q")
                break
            except BlockingIOError:   # a full pipe: the child is reading it, or stuck
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            except OSError:
                break
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:   # stuck in a store call: what it did not send stays in the spool
            self.proc.kill()
            self.proc.wait()
        self._reader.join(1.0)
        self.proc.stdout.close()


def _sender_main() -> None:
    """The sender process (``python -c``; argv: uri, run id, run folder): see :class:`_SenderProcess`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    uri, run_id, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out = os.fdopen(os.dup(1), "wb")   # the reports' own pipe; what MLflow prints goes to stderr
    os.dup2(2, 1)
    write_lock = threading.Lock()

    def report(sent: int, away: float | None) -> None:
        with write_lock:
            out.write(f"{sent} {'-' if away is None else repr(away)}\n".encode())
            out.flush()

    _quiet_store_errors()
    sender = _Sender(None, uri, run_id, folder, Spool(folder, reader=True), report)   # the client: at the first drain

    def listen() -> None:
        while True:
            data = os.read(0, 4096)
            if not data:   # stdin closed
                if not sender.stopping:
                    os._exit(0)   # without "q" first: the trainer died, the spool keeps what is left
                return
            if b"q" in data:
                sender.stopping = True
            sender.wake.set()

    threading.Thread(target=listen, daemon=True).start()
    report(0, None)
    sender.run()
    sender.drain()   # what came in while the last drain ran
    report(sender.sent, sender.away_since)
    sender.spool.close()


def _sender_kind() -> str:
    kind = os.environ.get(SENDER_ENV, "process")
    if kind not in ("process", "thread"):
        raise LayerLockError(f"{SENDER_ENV}={kind!r}: use 'process' or 'thread'")
    return kind


def _start_sender(client, uri: str, run_id: str, folder: Path, spool: Spool):
    """The run's sender: a process of its own unless ``LAYERLOCK_SENDER=thread`` (or it cannot
    be started, with a warning)."""
    if _sender_kind() == "process":
        try:
            return _SenderProcess(uri, run_id, folder, spool)
        except OSError as err:
            print(f"warning: cannot start the tracking sender process ({first_line(err)[:160]}); "
                  "sending from a thread", file=sys.stderr)
    sender = _Sender(client, uri, run_id, folder, spool)
    sender.start()
    return sender


def push_spool(client, run_id: str, folder: Path) -> int:
    """Send what a run's spool holds, now, in order (``sync`` and resume); returns the number of
    lines sent. Raises LayerLockError when the store does not take a line (the rest stays)."""
    path = folder / SPOOL_FILE
    if not path.exists() or path.stat().st_size == 0:
        return 0
    spool = Spool(folder)
    sent, offset = 0, 0
    try:
        for end, ops in _units(spool.read(0)):
            try:
                _send(client, run_id, folder, ops)
            except Exception as err:
                if not _permanent(err):
                    raise LayerLockError(f"run {run_id}: the tracking store did not take the spooled lines "
                                         f"({first_line(err)[:200]}); they stay in {path}") from None
                _reject(folder, ops, err)
            sent, offset = sent + len(ops), end
        spool.trim(offset)
    finally:
        spool.close()
    return sent


def remove_if_done(folder: Path, status: str) -> bool:
    """Delete a FINISHED run's local folder once its spool is empty (the store has it all)."""
    spool = folder / SPOOL_FILE
    if status != "FINISHED" or (spool.exists() and spool.stat().st_size):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


# ----------------------------------------------------------------------------- the tracker

class Tracker:
    """A started (or resumed) MLflow run. ``enabled=False`` makes every call a no-op (non-zero ranks).

    A training tracker (new run, or resume) logs through the run's local folder and spool; a
    ``read_only`` one (evaluate, checkpoint lookups) reads, and writes the few metrics it is
    given directly."""

    def __init__(self, *, uri: str | None = None, experiment: str = "layerlock", run_id: str | None = None,
                 run_name: str | None = None, tags: dict[str, str] | None = None, enabled: bool = True,
                 read_only: bool = False) -> None:
        """``run_id`` given: resume that run (or, with ``read_only``, just attach to read its artifacts)."""
        self.enabled = enabled
        self.uri = resolve_uri(uri)
        self.run_id: str | None = run_id
        self.folder: Path | None = None
        self._spool: Spool | None = None
        self._sender: _Sender | _SenderProcess | None = None
        self._lock_fd: int | None = None
        self._pending: list[list] = []
        self._last_step: dict[str, int] = {}
        self._last_submit = time.monotonic()
        if not enabled:
            return
        if not read_only:
            _sender_kind()   # a bad LAYERLOCK_SENDER fails before a run is created
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
                self.folder = local_dir(run_id) if local_dir(run_id).is_dir() else None
                return
            check_owner(run)   # a live trainer elsewhere: refused before anything changes
            self._open_folder(run_id)
            try:
                self._take_over(run_id)
            except BaseException:
                self.close()
                raise
        else:
            run = self.client.create_run(exp_id, run_name=run_name, tags={**(tags or {}), **owner_tags()})
            self.run_id = run.info.run_id
            self._open_folder(self.run_id)
        _quiet_store_errors()
        self._sender = _start_sender(self.client, self.uri, self.run_id, self.folder, self._spool)

    def _take_over(self, run_id: str) -> None:
        """Resume: own the run, send what the last trainer left, then note the steps stored.
        The status stays as it is until the caller has loaded a checkpoint (mark_running), so a
        resume that fails leaves a finished run FINISHED."""
        for key, value in owner_tags().items():
            self.client.set_tag(run_id, key, value)
        push_spool(self.client, run_id, self.folder)   # before counting steps: they may be in it
        # Per key, the last step already stored: those steps are not logged again.
        for key in self.client.get_run(run_id).data.metrics:
            hist = self.client.get_metric_history(run_id, key)
            self._last_step[key] = max(m.step for m in hist)

    def _open_folder(self, run_id: str) -> None:
        self.folder = local_dir(run_id)
        self._lock_fd = _lock_folder(self.folder, run_id)
        for stale in self.folder.glob("*/.*.tmp"):   # half-written by a killed trainer: never published
            stale.unlink(missing_ok=True)
        atomic_write(self.folder / META_FILE, lambda f: f.write(json.dumps(
            {"run_id": run_id, "tracking_uri": absolute_uri(self.uri)}).encode()))
        self._spool = Spool(self.folder)

    def mark_running(self) -> None:
        """A resumed run is RUNNING again (called once its checkpoint has loaded)."""
        if self.enabled and self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")

    # -- metrics -----------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics for ``step``; they go out at the next :meth:`submit` (non-blocking)."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)   # kept with the metric: a second send of it is a no-op
        for key, value in metrics.items():
            if step <= self._last_step.get(key, -1):
                continue
            self._pending.append([key, float(value), now, int(step)])

    def submit(self, force: bool = False) -> None:
        """Hand queued metrics on in lines of <= 1000 (non-blocking); without ``force``, only once
        ``SUBMIT_INTERVAL_S`` has passed or a full batch is waiting."""
        if not self.enabled or not self._pending:
            return
        if not force and len(self._pending) < MAX_BATCH and time.monotonic() - self._last_submit < SUBMIT_INTERVAL_S:
            return
        self._last_submit = time.monotonic()
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), MAX_BATCH):
            self._put({"op": "metrics", "m": pending[i:i + MAX_BATCH]})

    def _put(self, op: dict[str, Any]) -> None:
        """Into the spool for the sender, or (read-only trackers) straight to the store."""
        if self._spool is not None:
            self._spool.append(op)
            self._sender.wake.set()
        else:
            _send(self.client, self.run_id, self.folder or Path("."), [op])

    def make_durable(self) -> None:
        """Everything logged so far is on disk (fsynced): called before a checkpoint is published,
        so no checkpoint ever exists whose metrics could be lost."""
        if not self.enabled:
            return
        self.submit(force=True)
        if self._spool is not None:
            self._spool.fsync()

    def flush(self, limit_s: float | None = None) -> bool:
        """Wait until everything logged is in the store; while the store is away, for at most
        ``limit_s`` (END_WAIT_S) seconds. Returns whether everything was sent."""
        if not self.enabled:
            return True
        self.submit(force=True)
        sender = self._sender
        if sender is None:
            return True
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
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        """Synchronous: a new run logs them right after the store answered its creation."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload ``path`` (in the background for a training run: the file must stay until sent)."""
        if self.enabled:
            self._put({"op": "artifact", "path": str(Path(path).resolve()), "dir": artifact_path})

    def log_file(self, name: str, write: Callable[[IO[bytes]], None]) -> Path | None:
        """Store the artifact ``name`` written by ``write(file)``. A spooled run keeps it in its
        local folder (the upload happens later; the path is returned), else it goes up now."""
        if not self.enabled:
            return None
        parent = str(Path(name).parent) if Path(name).parent != Path(".") else None
        if self.folder is not None and self._spool is not None:
            p = self.folder / FILES_DIR / name
            atomic_write(p, write)
            self.log_artifact(p, parent)
            return p
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / Path(name).name
            with open(p, "wb") as f:
                write(f)
            self.log_artifact(p, parent)
        return None

    def local_file(self, name: str) -> Path | None:
        """The local copy of an artifact stored by :meth:`log_file`, if this run has one."""
        if self.folder is None:
            return None
        p = self.folder / FILES_DIR / name
        return p if p.is_file() else None

    def log_text(self, text: str, name: str) -> None:
        self.log_file(name, lambda f: f.write(text.encode()))

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
        """Mark the run ``status`` (through the spool, after everything logged before it)."""
        if not self.enabled:
            return
        self.submit(force=True)
        self._put({"op": "status", "status": status})
        self._close(status)

    def fail(self, reason: str) -> None:
        """Keep what was logged, record why, mark the run FAILED."""
        if not self.enabled:
            return
        self.submit(force=True)
        self._put({"op": "tag", "key": TAG_FAILURE, "value": reason[:4000]})
        self._put({"op": "status", "status": "FAILED"})
        self._close("FAILED")

    def _close(self, status: str) -> None:
        if self._sender is None:
            return
        sent = self.flush()
        self.close()
        if not sent:
            print(f"warning: tracking store {self.uri} still does not answer: what run {self.run_id} logged last "
                  f"(and its {status} status) waits in {self.folder / SPOOL_FILE}; send it with "
                  f"`python -m experiments sync {self.run_id}`", file=sys.stderr)
        elif self.folder is not None:
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


# ----------------------------------------------------------------------------- sync

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
    client = _client(uri)
    try:
        client.get_run(run_id)
    except Exception:
        raise RunNotFoundError(f"run not found: {run_id} (tracking URI {uri})") from None
    if not meta.is_file():
        return 0, client.get_run(run_id).info.status
    fd = _lock_folder(folder, run_id)
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
    return sorted(p.name for p in root.iterdir()
                  if (p / META_FILE).is_file() and (p / SPOOL_FILE).is_file() and (p / SPOOL_FILE).stat().st_size)
