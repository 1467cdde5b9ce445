"""Training runs launched from the dashboard as child processes: the supervision the Launch and
Schedule pages call (no Streamlit in here; the pages render).

The dashboard never trains in its own process (docs/architecture.md, "Layers"): it starts
``python -m experiments pretrain ...`` with an argument list (no shell), writes the child's
stdout and stderr to files under the launch folder, and reads progress back from MLflow and
from the log.

Layout of the runs folder (``$LAYERLOCK_RUNS_DIR``, else ``runs/`` in the repository)::

    runs/launch/<job_id>.json   what was started (argv, pid, run name, tracking URI, times)
    runs/launch/<job_id>.out    the child's stdout; its last line is the MLflow run id
    runs/launch/<job_id>.log    the child's stderr (tqdm progress, errors)
    runs/schedules/*.json       schedules written by the schedule page for a launch

Conventions:

- A job is found in MLflow by its job id: :func:`start` adds ``--tag layerlock.job_id=<job_id>``
  (``schema.TAG_JOB``) to the pretrain command, so the run carries it from its creation on (the
  run id is only printed when training ends; run names need not be unique).
- ``Popen`` objects live in a module-level registry, so any session of this server process can
  poll (and reap) a child. A job started by an earlier server process is trusted only while its
  pid is > 1 and ``/proc/<pid>`` shows the job's command line and start time: a reused pid (after
  a restart) or an edited job file never gets a signal.
- Job files are written atomically (a temporary file, then ``os.replace``).
- At most ``max_jobs()`` jobs run at once (``$LAYERLOCK_MAX_JOBS``, default 2); ``start`` raises
  JobLimitReached beyond that.
- Text fields go to the child as strings (:func:`string_override`), never parsed as YAML: run
  name ``exp #2`` stays ``exp #2``.
- Cancel sends SIGINT first: the trainer turns KeyboardInterrupt into a FAILED run with a
  reason; SIGTERM and SIGKILL follow if the child does not exit.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from analysis import LayerLockError, absolute_uri, schema

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "experiments" / "configs"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# Exit status of the CLI: 0 done, 2 bad input, 1 diverged, 130 interrupted.
# 143: the trainer's own exit after a SIGTERM it handled (checkpointed, run marked KILLED).
EXIT_MEANING = {
    0: "finished",
    1: "failed",
    2: "bad input",
    130: "cancelled",
    -2: "cancelled",
    -15: "cancelled",
    143: "terminated",
    -9: "killed",
}

_PROCS: dict[str, subprocess.Popen] = {}  # job_id -> child of this server process
MAX_JOBS_ENV = "LAYERLOCK_MAX_JOBS"
DEFAULT_MAX_JOBS = 2


class JobLimitReached(LayerLockError):
    """As many jobs as ``max_jobs()`` are already running."""


def max_jobs() -> int:
    """``$LAYERLOCK_MAX_JOBS`` (a positive integer), else 2: concurrent training children."""
    raw = os.environ.get(MAX_JOBS_ENV, "")
    try:
        return max(1, int(raw)) if raw.strip() else DEFAULT_MAX_JOBS
    except ValueError:
        return DEFAULT_MAX_JOBS


def string_override(key: str, value: str) -> str:
    """``key="value"``: a JSON string is a YAML double-quoted scalar, so ``--set`` keeps ``value``
    as the exact string (``exp #2`` would otherwise parse as ``exp``, ``007`` as 7)."""
    return f"{key}={json.dumps(value)}"


def runs_dir() -> Path:
    """``$LAYERLOCK_RUNS_DIR``, else ``runs/`` in the repository (ignored by git)."""
    return Path(os.environ.get("LAYERLOCK_RUNS_DIR") or ROOT / "runs")


def launch_dir() -> Path:
    return runs_dir() / "launch"


def schedule_dir() -> Path:
    return runs_dir() / "schedules"


def config_files() -> list[Path]:
    """The YAML configs a launch can start from, ``mae_tiny.yaml`` first."""
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    return sorted(files, key=lambda p: (p.name != "mae_tiny.yaml", p.name))


def pretrain_argv(
    config: str | Path,
    overrides: list[str] | None = None,
    tags: dict[str, str] | None = None,
    tracking_uri: str | None = None,
) -> list[str]:
    """``[python, -m, experiments, pretrain, --config, FILE, --set k=v ..., --tag k=v ..., --tracking-uri URI]``."""
    argv = [sys.executable, "-m", "experiments", "pretrain", "--config", str(config)]
    for item in overrides or []:
        argv += ["--set", item]
    for key, value in (tags or {}).items():
        argv += ["--tag", f"{key}={value}"]
    if tracking_uri:
        # A relative sqlite file is one in the dashboard's working directory; the child runs in the
        # repository root.
        argv += ["--tracking-uri", absolute_uri(tracking_uri)]
    return argv


def freeze_test_argv(baseline: str, executor: str, workers: int, tracking_uri: str | None = None) -> list[str]:
    """``[python, -m, experiments, freeze-test, --baseline RUN, --grid, --executor E, --workers N,
    --tracking-uri URI]``: a baseline's freeze-test grid through the executor."""
    argv = [sys.executable, "-m", "experiments", "freeze-test", "--baseline", baseline, "--grid"]
    argv += ["--executor", executor, "--workers", str(int(workers))]
    if tracking_uri:
        argv += ["--tracking-uri", absolute_uri(tracking_uri)]
    return argv


def override_lines(text: str) -> list[str]:
    """One ``key=value`` per line (blank lines and ``#`` comments skipped); raises ValueError."""
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, _ = line.partition("=")
        if not sep or not key.strip() or " " in key.strip():
            raise ValueError(f"override line {n}: expected key=value, got {line!r}")
        out.append(line)
    return out


def new_run_name(objective: str) -> str:
    """A readable, unique run name: ``<objective>-<MMDD-HHMMSS>-<4 hex>``."""
    return f"{objective}-{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass
class Job:
    """One launched child process (persisted as ``<job_id>.json``)."""

    job_id: str
    argv: list[str]
    pid: int
    run_name: str
    tracking_uri: str
    started: float
    source: str = "launch"  # which page started it
    cancelled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    pid_start: int | None = None  # the child's start time (/proc/<pid>/stat, clock ticks after boot)

    @property
    def out_path(self) -> Path:
        return launch_dir() / f"{self.job_id}.out"

    @property
    def log_path(self) -> Path:
        return launch_dir() / f"{self.job_id}.log"

    @property
    def meta_path(self) -> Path:
        return launch_dir() / f"{self.job_id}.json"

    def save(self) -> None:
        """Atomic: a reader sees the old file or the new one, never half of it."""
        tmp = self.meta_path.with_name(f".{self.meta_path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, self.meta_path)

    @classmethod
    def load(cls, path: Path) -> Job | None:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None  # a half-written or foreign file is not a job


def start(
    argv: list[str],
    run_name: str,
    tracking_uri: str,
    source: str = "launch",
    extra: dict[str, Any] | None = None,
    tag_run: bool = True,
) -> Job:
    """Start ``argv`` (a :func:`pretrain_argv` or :func:`freeze_test_argv`) in the repository root
    with stdout/stderr to files, tagging the run with the job id (``tag_run``; ``freeze-test`` tags
    its children itself and takes no ``--tag``); returns the job. Raises JobLimitReached when
    ``max_jobs()`` jobs are running."""
    running = sum(is_running(j) for j in list_jobs(limit=1000))
    if running >= max_jobs():
        raise JobLimitReached(
            f"{running} jobs are running (at most {max_jobs()}, ${MAX_JOBS_ENV}): wait for one to finish or cancel one"
        )
    folder = launch_dir()
    folder.mkdir(parents=True, exist_ok=True)
    job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    argv = [*argv, "--tag", f"{schema.TAG_JOB}={job_id}"] if tag_run else list(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": absolute_uri(tracking_uri)}
    out_path, log_path = folder / f"{job_id}.out", folder / f"{job_id}.log"
    with open(out_path, "wb") as out, open(log_path, "wb") as log:
        # Own session: a Ctrl-C on the dashboard server does not reach the training run.
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=log, env=env, start_new_session=True
        )
    _PROCS[job_id] = proc
    job = Job(
        job_id=job_id,
        argv=list(argv),
        pid=proc.pid,
        run_name=run_name,
        tracking_uri=tracking_uri,
        started=time.time(),
        source=source,
        extra=dict(extra or {}),
        pid_start=_start_time(proc.pid),
    )
    job.save()
    return job


def list_jobs(limit: int = 20) -> list[Job]:
    """Jobs found in the launch folder, newest first."""
    folder = launch_dir()
    if not folder.is_dir():
        return []
    jobs = [j for p in folder.glob("*.json") if (j := Job.load(p)) is not None]
    return sorted(jobs, key=lambda j: j.started, reverse=True)[:limit]


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot (field 22 of /proc/<pid>/stat), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)" start at field 3
    except (OSError, IndexError, ValueError):
        return None


def _is_our_child(job: Job) -> bool:
    """True only when ``job.pid`` is still the process this job started: pid > 1 (0 and -1 would
    signal whole process groups), same command line, same start time. Unverifiable: False."""
    pid = job.pid
    if not isinstance(pid, int) or pid <= 1 or job.pid_start is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if [c.decode(errors="replace") for c in cmdline if c] != list(job.argv):
        return False
    return _start_time(pid) == job.pid_start


def returncode(job: Job) -> int | None:
    """Exit status when this server process started the child and it ended, else None."""
    proc = _PROCS.get(job.job_id)
    return None if proc is None else proc.poll()


def is_running(job: Job) -> bool:
    proc = _PROCS.get(job.job_id)
    if proc is not None:
        return proc.poll() is None
    return _is_our_child(job)


def status(job: Job) -> str:
    """``running``, ``finished``, ``failed``, ``bad input``, ``cancelled``, ``terminated``, ``killed``
    or ``exited``."""
    if is_running(job):
        return "running"
    rc = returncode(job)
    if job.cancelled:
        return "cancelled"
    if rc is None:  # started by another server process: judge by the printed run id
        return "finished" if run_id(job) else "exited"
    return EXIT_MEANING.get(rc, "failed")


def run_id(job: Job) -> str | None:
    """The MLflow run id the child printed as its last stdout line (None until it finishes)."""
    try:
        lines = [ln.strip() for ln in job.out_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1] if lines and RUN_ID.match(lines[-1]) else None


def tail(path: Path, lines: int = 25, max_bytes: int = 32_768) -> str:
    """The last ``lines`` lines of a log; tqdm's carriage-return updates count as lines and only
    the newest of a run of identical-prefix progress updates is kept."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    parts = [p.rstrip() for p in re.split(r"[\r\n]+", text)]
    out: list[str] = []
    for part in parts:
        if not part:
            continue
        # A tqdm bar redraws itself: keep only its latest state.
        if out and "%|" in part and "%|" in out[-1] and part.split(":")[0] == out[-1].split(":")[0]:
            out[-1] = part
        else:
            out.append(part)
    return "\n".join(out[-lines:])


def last_error(job: Job) -> str | None:
    """The CLI's one-line ``error: ...`` message from the log, if any."""
    for line in reversed(tail(job.log_path, 50).splitlines()):
        if line.startswith("error:"):
            return line
    return None


def cancel(job: Job, grace_s: float = 5.0) -> str:
    """Stop a running child: SIGINT, then SIGTERM, then SIGKILL. Returns what it took."""
    job.cancelled = True
    job.save()
    proc = _PROCS.get(job.job_id)
    if proc is None:
        # Checked before every signal: the pid may be reused the moment the child exits.
        if not _is_our_child(job):
            return "not running"
        for sig in (signal.SIGINT, signal.SIGTERM):
            if not _is_our_child(job):
                return "not running"
            os.kill(job.pid, sig)
            deadline = time.time() + grace_s
            while time.time() < deadline and _is_our_child(job):
                time.sleep(0.1)
            if not _is_our_child(job):
                return sig.name
        if _is_our_child(job):
            os.kill(job.pid, signal.SIGKILL)
        return "SIGKILL"
    if proc.poll() is not None:
        return "not running"
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
            return sig.name
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    proc.wait(timeout=grace_s)
    return "SIGKILL"


def wait(job: Job, timeout: float) -> int | None:
    """Block until a child of this process ends (tests); returns its exit status."""
    proc = _PROCS.get(job.job_id)
    if proc is None:
        return None
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def write_schedule(schedule: dict[str, Any], name: str) -> Path:
    """Write a schedule JSON under ``runs/schedules`` for a launch; returns the absolute path."""
    folder = schedule_dir()
    folder.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    path = (folder / f"{safe}.json").resolve()
    path.write_text(json.dumps(schedule, indent=2) + "\n")
    return path


def saved_schedules() -> list[Path]:
    folder = schedule_dir()
    return sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []


# Sections of a source run's params copied into a LayerLock twin (same model, data, training).
TWIN_SECTIONS = ("model", "data", "train", "probe")


def twin_overrides(params: dict[str, str], sections: tuple[str, ...] = TWIN_SECTIONS) -> list[str]:
    """``--set`` overrides that give a new run the source run's settings in ``sections``.

    Params are the flattened config as strings; ``--set`` parses values as YAML scalars, so
    ``"4"`` comes back as 4 and ``"True"`` as true. Unset values (``"None"``) are skipped.
    """
    out = []
    for key, value in sorted(params.items()):
        if key.split(".", 1)[0] in sections and value not in ("None", "") and "\n" not in value:
            out.append(f"{key}={value}")
    return out
