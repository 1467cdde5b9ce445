"""The run's sender: sends the spool to the store in order, and tries again while the store is away.

By default a process of its own (:class:`SenderProcess`, started as ``python -m
core.tracking.sender URI RUN_ID FOLDER``), so that MLflow's store calls never hold the training
loop's interpreter lock; a thread of the trainer (:class:`SenderThread`) with
``LAYERLOCK_SENDER=thread``. The package does not import this module: a tracker imports it when
it starts its sender (run as ``__main__``, a module the package had imported already would be
imported twice).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from core.errors import LayerLockError, first_line
from core.schema import TAG_HEARTBEAT
from core.tracking import store
from core.tracking.owner import HEARTBEAT_S
from core.tracking.spool import Spool, units
from core.tracking.uri import absolute_uri, answers

SENDER_ENV = "LAYERLOCK_SENDER"  # "process" (default) or "thread"
PROBE_INTERVAL_S = 2.0  # while the store is away: how often the sender tries again


class SenderThread(threading.Thread):
    """Sends a run's spool in order; while the store is away, tries again every PROBE_INTERVAL_S.

    A thread of the trainer (``LAYERLOCK_SENDER=thread``), or the main loop of the sender
    process (:class:`SenderProcess`), which passes ``report``: called with ``(bytes sent in
    all, away_since)`` whenever either changes."""

    def __init__(
        self,
        client,
        uri: str,
        run_id: str,
        folder: Path,
        spool: Spool,
        report: Callable[[int, float | None], None] | None = None,
    ) -> None:
        super().__init__(name=f"layerlock-sender-{run_id[:8]}", daemon=True)
        self.client, self.uri, self.run_id, self.folder, self.spool = client, uri, run_id, folder, spool
        self.offset = 0
        self.sent = 0  # bytes of spool lines sent (or rejected), over every trim
        self.report = report
        self.wake = threading.Event()
        self.stopping = False
        self.away_since: float | None = None  # monotonic time the store stopped answering
        self.waited = 0  # lines sent since the store came back
        self._last_beat = time.monotonic()

    def run(self) -> None:
        while not self.stopping:
            self.wake.wait(PROBE_INTERVAL_S if self.away_since is not None else HEARTBEAT_S / 3)
            self.wake.clear()
            try:
                self.drain()
                self.heartbeat()
            except Exception as err:  # never die silently: the trainer waits on this thread
                self.went_away(err)

    def caught_up(self) -> bool:
        return self.offset == self.spool.size()

    def drain(self) -> None:
        if self.away_since is not None and not answers(self.uri):
            return  # a refused connection: no need to read the spool or wait for MLflow's retries
        if self.client is None:  # the sender process opens the store itself (it may be locked or away)
            try:
                self.client = store.client(self.uri)
            except Exception as err:
                self.went_away(err, time.monotonic())
                return
        for end, ops in units(self.spool.read(self.offset)):
            tried = time.monotonic()
            try:
                store.send(self.client, self.run_id, self.folder, ops)
            except Exception as err:
                if not store.permanent(err):
                    self.went_away(err, tried)
                    return
                store.reject(self.folder, ops, err)
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
            pass  # the next line sent finds out whether the store is away

    def went_away(self, err: BaseException, since: float | None = None) -> None:
        if self.away_since is None:
            self.away_since = since or time.monotonic()
            print(
                f"warning: tracking store {self.uri} does not answer ({first_line(err)[:160]}); training goes "
                f"on, what it logs waits in {self.spool.path} and is sent when the store answers",
                file=sys.stderr,
            )
            self._report()

    def came_back(self) -> None:
        gone = time.monotonic() - (self.away_since or time.monotonic())
        self.away_since = None
        print(
            f"tracking store {self.uri} answers again ({gone:.0f} s after the first line it did not take): "
            "sending what waited",
            file=sys.stderr,
        )

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        self.wake.set()
        self.join(timeout)


class _Wake:
    """The sender process's wake-up: a byte down its stdin (never blocks: a full pipe already
    holds a wake-up, and a gone process is found out by ``is_alive``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def set(self) -> None:
        try:
            os.write(self.fd, b"w")
        except OSError:  # a full pipe (BlockingIOError) or a gone process (BrokenPipeError)
            pass


class SenderProcess:
    """The sender (:class:`SenderThread`) in a process of its own, so that MLflow's store calls
    (Python-heavy, with the sqlite store above all) never take the interpreter lock from the
    training loop. The same interface as the thread: ``wake.set()``, ``caught_up()``,
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
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            # The child runs in the repo root: a relative sqlite URI or folder must name this process's.
            [sys.executable, "-m", "core.tracking.sender", absolute_uri(uri), run_id, str(Path(folder).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=root,
        )
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
        while self.is_alive():  # "q" must arrive: stdin closing without it means the trainer died
            try:
                os.write(self.wake.fd, b"q")
                break
            except BlockingIOError:  # a full pipe: the child is reading it, or stuck
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
        except subprocess.TimeoutExpired:  # stuck in a store call: what it did not send stays in the spool
            self.proc.kill()
            self.proc.wait()
        self._reader.join(1.0)
        self.proc.stdout.close()


def main() -> None:
    """The sender process (``python -m core.tracking.sender URI RUN_ID FOLDER``): see :class:`SenderProcess`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    uri, run_id, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out = os.fdopen(os.dup(1), "wb")  # the reports' own pipe; what MLflow prints goes to stderr
    os.dup2(2, 1)
    write_lock = threading.Lock()

    def report(sent: int, away: float | None) -> None:
        with write_lock:
            out.write(f"{sent} {'-' if away is None else repr(away)}\n".encode())
            out.flush()

    store.quiet_store_errors()
    # The client is opened at the first drain (the store may be locked or away now).
    sender = SenderThread(None, uri, run_id, folder, Spool(folder, reader=True), report)

    def listen() -> None:
        while True:
            data = os.read(0, 4096)
            if not data:  # stdin closed
                if not sender.stopping:
                    os._exit(0)  # without "q" first: the trainer died, the spool keeps what is left
                return
            if b"q" in data:
                sender.stopping = True
            sender.wake.set()

    threading.Thread(target=listen, daemon=True).start()
    report(0, None)
    sender.run()
    sender.drain()  # what came in while the last drain ran
    report(sender.sent, sender.away_since)
    sender.spool.close()


def sender_kind() -> str:
    kind = os.environ.get(SENDER_ENV, "process")
    if kind not in ("process", "thread"):
        raise LayerLockError(f"{SENDER_ENV}={kind!r}: use 'process' or 'thread'")
    return kind


def start_sender(client, uri: str, run_id: str, folder: Path, spool: Spool):
    """The run's sender: a process of its own unless ``LAYERLOCK_SENDER=thread`` (or it cannot
    be started, with a warning)."""
    if sender_kind() == "process":
        try:
            return SenderProcess(uri, run_id, folder, spool)
        except OSError as err:
            print(
                f"warning: cannot start the tracking sender process ({first_line(err)[:160]}); sending from a thread",
                file=sys.stderr,
            )
    sender = SenderThread(client, uri, run_id, folder, spool)
    sender.start()
    return sender


if __name__ == "__main__":
    main()
