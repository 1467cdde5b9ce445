"""Many independent runs at once: one executor for freeze-test children, seed groups, the demo and the study.

A :class:`RunSpec` is one run to train (its resolved config, tags, the checkpoint it branches
off); :func:`run_specs` trains a list of them through one of three back ends and returns one
:class:`RunResult` each, in the order given:

- ``serial``: one after another in this process (per-run progress bars on a terminal);
- ``local``: a pool of worker processes on this machine (``concurrent.futures.ProcessPoolExecutor``
  with the ``spawn`` context), one torch thread each;
- ``ray``: each run a Ray task with the spec's ``num_cpus``/``num_gpus``, on the cluster at
  ``ray_address`` (a local one when None).

Every back end calls the same function, :func:`train_spec`, around :func:`core.train.train`.
With ``nproc_per_run`` N > 1 (``--nproc-per-run``), each run trains as N processes under torch's
own launcher: the worker starts ``python -m torch.distributed.run --standalone --nproc_per_node N
-m experiments.torchrun_spec FOLDER`` and waits for it; every rank calls the same
``train_spec`` path (:func:`core.train.train` sets up DistributedDataParallel under torchrun, rank 0
logs), and the task's result is what each rank wrote to FOLDER (:func:`rank_main`), not a guess.
Dependencies: ``run_specs(..., then=f)`` calls ``f(spec, result)`` as each spec finishes and
trains the specs it returns in the same set (a baseline's freeze-test children join as soon as it
has its checkpoints, while the rest of the set trains); without ``then`` the specs of one call are
independent.

Re-running: every run carries ``layerlock.run_key`` (:attr:`RunSpec.key`, made of its identifying
tags). Before training, a spec whose key already has a FINISHED run is not trained again; one
whose earlier run stopped (FAILED or KILLED, or RUNNING with a dead worker) resumes that run from
its last checkpoint, or, without one, replaces it (the old run is deleted), so the store holds
each run once. A run that fails, or whose worker dies, is marked FAILED with
``layerlock.failure_reason`` and the others go on; :class:`RunsFailed` is raised at the end.
docs/executor.md has the user's side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import LayerLockError, RunTerminated, first_line
from core.schema import CHECKPOINT_DIR, TAG_FAILURE, TAG_OWNER, TAG_RUN_KEY

if TYPE_CHECKING:  # pragma: no cover - typing only
    from core.config import ExperimentConfig
    from core.train import TrainResult

EXECUTORS = ("serial", "local", "ray")
DEFAULT_EXECUTOR = "local"
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
WORKER_DIED = "its worker process died"
RAY_CONNECT_TIMEOUT_S = 10.0
# Each run of a set sends its spool from a thread of its trainer's process (core.tracking.sender)
# unless LAYERLOCK_SENDER says otherwise: a sender process of its own costs every run about 4 s of
# CPU (an interpreter, MLflow's imports, opening the store) on the cores the runs share, and a
# worker that trains one run after another has MLflow imported and the store open already.
SENDER_ENV, RUN_SENDER = "LAYERLOCK_SENDER", "thread"
# --nproc-per-run N: torch's launcher, the module each of its ranks runs, and what they read and write
# in the run's folder (job.json from the worker, rank_R.json from rank R when it ends).
TORCHRUN = ("-m", "torch.distributed.run", "--standalone")
RANK_MODULE = "experiments.torchrun_spec"
JOB_FILE, RANK_FILE = "job.json", "rank_{rank}.json"
# A team tracking server (README, "Past one machine"): what a multi-host cluster logs to.
TEAM_SERVER = "a tracking server, e.g. --tracking-uri http://HOST:5000 (mlflow server with a PostgreSQL backend)"


@dataclass(frozen=True)
class RunSpec:
    """One run to train.

    ``config``: the resolved config (``ExperimentConfig.model_dump(mode="json")``); ``tags``: logged on
    the run; ``identity``: what makes the run this run (default: ``tags``), its :attr:`key`;
    ``init_from``: ``(run id, step)`` of a checkpoint to branch off (freeze-test children), loaded by
    the worker itself; ``num_cpus``/``num_gpus``: what a Ray task asks for.
    """

    label: str
    config: dict[str, Any]
    tags: dict[str, str]
    identity: dict[str, str] | None = None
    init_from: tuple[str, int] | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @property
    def key(self) -> str:
        """``k=v;k=v`` over the sorted identity: stable across re-runs of one command."""
        ident = self.tags if self.identity is None else self.identity
        return ";".join(f"{k}={v}" for k, v in sorted(ident.items()))


def spec_for(
    cfg: ExperimentConfig,
    label: str,
    tags: dict[str, str],
    *,
    identity: dict[str, str] | None = None,
    init_from: tuple[str, int] | None = None,
) -> RunSpec:
    """A :class:`RunSpec` of ``cfg``; a run on ``train.device=cuda`` asks Ray for one GPU."""
    return RunSpec(
        label=label,
        config=cfg.model_dump(mode="json"),
        tags=dict(tags),
        identity=None if identity is None else {k: str(v) for k, v in identity.items()},
        init_from=init_from,
        num_gpus=1.0 if cfg.train.device == "cuda" else 0.0,
    )


@dataclass
class RunResult:
    """What became of one spec: ``status`` FINISHED, FAILED or KILLED; ``reused``: it had FINISHED
    before this call and was not trained again; ``train``: the trainer's result when it trained here."""

    key: str
    label: str
    run_id: str | None
    status: str
    reason: str | None = None
    reused: bool = False
    train: TrainResult | None = field(default=None, repr=False)
    seconds: float | None = None  # this call's wall time for the run (set-up, training, uploads)

    def line(self) -> str:
        """One line for a log: the run, what became of it, its held-out loss."""
        if self.status != FINISHED:
            return f"{self.label}: {self.status} ({self.run_id or 'no run'}): {self.reason}"
        if self.reused:
            return f"{self.label}: already FINISHED ({self.run_id}), not trained again"
        t = self.train
        held = "" if t is None or t.heldout_loss is None else f", held-out loss {t.heldout_loss:.4f}"
        # this call's seconds, not the run's train/wall_s (which a branched run continues from its parent's)
        spent = "" if self.seconds is None else f" in {self.seconds:.0f} s"
        took = "" if t is None else f"{spent}, last train loss {t.final_loss:.4f}"
        return f"{self.label}: FINISHED{took}{held} ({self.run_id})"


class RunsFailed(Exception):
    """Some runs of a set did not finish; the command line lists them and exits 1."""

    def __init__(self, results: Sequence[RunResult]) -> None:
        self.results = list(results)
        self.failed = [r for r in self.results if r.status != FINISHED]
        super().__init__(f"{len(self.failed)} of {len(self.results)} runs did not finish")

    def lines(self) -> list[str]:
        return [f"  {r.line()}" for r in self.failed] + [
            f"{self}; run the same command again to train only what is missing"
        ]


# ----------------------------------------------------------------------------- options


def check_options(executor: str, workers: int | None, nproc_per_run: int = 1) -> None:
    """LayerLockError for an unknown back end, a worker or process count below 1, and for
    ``nproc_per_run`` > 1 in a command that runs under torchrun itself (its ranks would each
    start N more)."""
    if executor not in EXECUTORS:
        raise LayerLockError(f"--executor must be one of {', '.join(EXECUTORS)}, got '{executor}'")
    if workers is not None and workers < 1:
        raise LayerLockError(f"--workers must be at least 1, got {workers}")
    if nproc_per_run < 1:
        raise LayerLockError(f"--nproc-per-run must be at least 1, got {nproc_per_run}")
    if nproc_per_run > 1 and _under_torchrun():
        raise LayerLockError(
            f"--nproc-per-run {nproc_per_run} starts torchrun for each run itself: run the command without torchrun"
        )


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(nproc_per_run: int = 1) -> int:
    """One worker per ``nproc_per_run`` cores this process may use (each process trains with one
    torch thread), at least one."""
    return max(1, _cores() // nproc_per_run)


def add_options(p) -> None:
    """``--executor``, ``--workers``, ``--ray-address`` on a command that trains several runs."""
    p.add_argument(
        "--executor",
        default=DEFAULT_EXECUTOR,
        metavar="|".join(EXECUTORS),
        help="how the independent runs train: serial (one after another, here), local (a pool of "
        "worker processes, one torch thread each), ray (Ray tasks) (default local)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes for --executor local (default: one per core)"
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="auto|HOST:PORT",
        help="Ray cluster for --executor ray (default: start one on this machine)",
    )
    p.add_argument(
        "--nproc-per-run",
        type=int,
        default=1,
        metavar="N",
        help="train each run as N processes under torchrun (DistributedDataParallel; train.batch_size is "
        "the global batch), inside its worker or Ray task (default 1)",
    )


def options(args) -> dict[str, Any]:
    """The executor keywords of :func:`run_specs` from parsed ``add_options`` arguments (checked)."""
    check_options(args.executor, args.workers, args.nproc_per_run)
    return {
        "executor": args.executor,
        "workers": args.workers,
        "ray_address": args.ray_address,
        "nproc_per_run": args.nproc_per_run,
    }


# ----------------------------------------------------------------------------- the store (all of it here)


def _runs_of(key: str, uri: str) -> list:
    from analysis import io

    return io.runs_with_tag(TAG_RUN_KEY, key, uri)


def _has_checkpoint(run_id: str, uri: str) -> bool:
    from core.tracking import RunReader, local_checkpoints, local_dir

    if local_checkpoints(local_dir(run_id)):
        return True
    return bool(RunReader.open(run_id, uri).list_artifacts(CHECKPOINT_DIR))


def _mark_failed(run_id: str, reason: str, uri: str) -> bool:
    """A run whose trainer is gone (RUNNING, or FAILED by a rank whose error followed from another's): send
    what its spool kept, tag why, mark it FAILED.
    False when its owner still looks alive (another host, fresh heartbeat): it is left as it is."""
    from core.tracking import Tracker

    try:
        Tracker(uri=uri, run_id=run_id).fail(reason)
    except LayerLockError:
        return False
    return True


def _open_store(uri: str) -> None:
    """Create the store before workers write to it: several processes creating one sqlite file
    would race on its schema migrations."""
    from analysis import io

    io.client(uri).search_experiments(max_results=1)


def _settle(spec: RunSpec, uri: str, reason: str) -> RunResult | None:
    """The stored state of ``spec`` after its worker stopped without answering: its run FINISHED,
    KILLED (resumable) or FAILED; a RUNNING one has lost its worker and is marked FAILED with
    ``reason``. None when it has no run (it had not started)."""
    runs = _runs_of(spec.key, uri)
    if not runs:
        return None
    run = runs[0]
    status, why = run.status, run.tags.get(TAG_FAILURE)
    if status == "RUNNING" and _mark_failed(run.run_id, reason, uri):
        status, why = FAILED, reason
    return RunResult(spec.key, spec.label, run.run_id, status, why or (None if status == FINISHED else status))


def _plan(specs: Sequence[RunSpec], uri: str) -> tuple[dict[int, RunResult], dict[int, str | None]]:
    """``(done, todo)``: results of specs that FINISHED before; for the others, the run to resume
    (an earlier attempt with a checkpoint) or None (a new run; an attempt without one is deleted)."""
    done: dict[int, RunResult] = {}
    todo: dict[int, str | None] = {}
    for i, spec in enumerate(specs):
        runs = _runs_of(spec.key, uri)
        finished = [r for r in runs if r.status == FINISHED]
        if finished:
            done[i] = RunResult(spec.key, spec.label, finished[0].run_id, FINISHED, reused=True)
            continue
        todo[i] = None
        for run in runs:
            if run.status == "RUNNING" and not _mark_failed(run.run_id, WORKER_DIED, uri):
                raise LayerLockError(
                    f"{spec.label}: run {run.run_id} is still being trained by "
                    f"{run.tags.get(TAG_OWNER, 'another process')}; wait for it to end"
                )
            if todo[i] is None:
                todo[i] = _resumable(run.run_id, uri)
            else:  # a newer attempt is resumed: this one would count twice
                _drop(run.run_id, uri)
    return done, todo


def _resumable(run_id: str, uri: str) -> str | None:
    """``run_id`` when the stopped run has a checkpoint to resume from; else it is deleted (a new run
    replaces it, and the store holds the run once) and None."""
    if _has_checkpoint(run_id, uri):
        return run_id
    _drop(run_id, uri)
    return None


def _drop(run_id: str, uri: str) -> None:
    from analysis import io

    io.delete_run(run_id, uri)


# ----------------------------------------------------------------------------- the worker side


def _pool_worker(workers: int = 1) -> None:
    """A pool worker's setup: one torch thread (the workers share the cores; ``core.perf.spare_core``
    is told how many share them), and Ctrl-C left to the command, which stops its workers with
    SIGTERM (each trainer checkpoints and marks KILLED)."""
    from core.perf import SHARING_ENV

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ[SHARING_ENV] = str(workers)
    _one_thread()


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def train_spec(spec: RunSpec, resume: str | None, uri: str, *, where: str = "pool", nproc: int = 1) -> RunResult:
    """Train one spec: every back end's worker. ``where``: ``here`` (serial, in the command's own
    process), ``pool`` or ``ray``. A run that raises comes back FAILED (the trainer has marked it so,
    with its reason). Stopped by SIGTERM, a pool worker ends with its run KILLED and stored (so it
    starts nothing more); in the command's own process Ctrl-C and SIGTERM end the command.
    ``nproc`` > 1: the run trains as that many processes under torchrun (:func:`_train_ranks`)."""
    if where == "ray":
        _one_thread()
    with _run_sender():
        if nproc > 1:
            return _train_ranks(spec, resume, uri, where, nproc)
        return _train_spec(spec, resume, uri, where)


@contextlib.contextmanager
def _run_sender():
    """:data:`RUN_SENDER` as the run's sender while it trains, unless the environment names one."""
    if SENDER_ENV in os.environ:
        yield
        return
    os.environ[SENDER_ENV] = RUN_SENDER
    try:
        yield
    finally:
        os.environ.pop(SENDER_ENV, None)


def _train_spec(spec: RunSpec, resume: str | None, uri: str, where: str, progress: bool | None = None) -> RunResult:
    from core.config import config_from_dict
    from core.train import load_run_checkpoint, train

    t0 = time.perf_counter()
    try:
        cfg = config_from_dict(spec.config, spec.label)
        init = None
        if spec.init_from is not None and resume is None:
            init = load_run_checkpoint(spec.init_from[0], step=spec.init_from[1], tracking_uri=uri)
        result = train(
            cfg,
            tracking_uri=uri,
            resume_run_id=resume,
            tags={**spec.tags, TAG_RUN_KEY: spec.key},
            init_state=init,
            progress=where == "here" and sys.stderr.isatty() if progress is None else progress,
        )
    except RunTerminated as err:
        if where == "pool":
            os._exit(128 + signal.SIGTERM)
        if where == "here":
            raise
        return RunResult(spec.key, spec.label, resume, KILLED, first_line(err))
    except Exception as err:
        return RunResult(spec.key, spec.label, resume, FAILED, f"{type(err).__name__}: {first_line(err)}")
    return RunResult(spec.key, spec.label, result.run_id, FINISHED, train=result, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- N processes a run (torchrun)


def _train_ranks(spec: RunSpec, resume: str | None, uri: str, where: str, nproc: int) -> RunResult:
    """Train ``spec`` as ``nproc`` processes under torchrun and read back what its ranks wrote.

    torchrun runs in a session of its own (a Ctrl-C at the terminal reaches it through this
    process, once) and gets SIGTERM when this process dies (Linux), so a killed worker leaves no
    ranks training. SIGTERM here (the pool stopping its workers) and Ctrl-C are passed on to it;
    torchrun passes them to its ranks, whose trainers end as they do in one process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="layerlock-ranks-") as tmp:
        folder = Path(tmp)
        job = {
            "spec": dataclasses.asdict(spec),
            "resume": resume,
            "uri": uri,
            "progress": where == "here" and sys.stderr.isatty(),
        }
        (folder / JOB_FILE).write_text(json.dumps(job))
        cmd = [sys.executable, *TORCHRUN, f"--nproc_per_node={nproc}", "-m", RANK_MODULE, str(folder)]
        # The ranks' stdout goes to stderr: a command's stdout carries its run ids alone.
        proc = subprocess.Popen(cmd, env=_rank_env(nproc), stdout=2, start_new_session=True, preexec_fn=_ends_with_us())
        stopped = _wait_for(proc)
        result = _ranks_result(spec, resume, uri, folder, nproc, proc.returncode, stopped)
    if result.status == FINISHED:  # torchrun's start and the ranks' set-up included
        result.seconds = time.perf_counter() - t0
    if stopped and where == "pool":  # as a one-process run's worker: it starts nothing more
        os._exit(128 + signal.SIGTERM)
    if stopped and where == "here":
        raise RunTerminated(result.reason or f"SIGTERM: run {result.run_id} stopped")
    return result


def _rank_env(nproc: int) -> dict[str, str]:
    """The ranks' environment: this one, the project on ``PYTHONPATH`` (whatever the folder), and the
    cores shared among the ranks unless ``OMP_NUM_THREADS`` says otherwise (torchrun's own default
    is one thread each, with a warning)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH")] if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // nproc)))
    return env


def _ends_with_us() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the child SIGTERM when this thread's process ends
    (``prctl(PR_SET_PDEATHSIG)``); None where there is no such call."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, pr_set_pdeathsig, sigterm = os.getpid(), 1, int(signal.SIGTERM)

    def set_death_signal() -> None:
        prctl(pr_set_pdeathsig, sigterm)
        if os.getppid() != parent:  # gone already, before the call
            os.kill(os.getpid(), sigterm)

    return set_death_signal


def _wait_for(proc: subprocess.Popen) -> bool:
    """Wait for torchrun to end; whether it was stopped by a SIGTERM to this process (passed on to
    it; main thread only). Ctrl-C (KeyboardInterrupt) is passed on as SIGINT and raised once
    torchrun has ended (its ranks' trainers mark their run as one process's trainer does)."""
    stopped: list[int] = []

    def forward(signum, frame) -> None:
        stopped.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if main else None
    try:
        try:
            proc.wait()
        except KeyboardInterrupt:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            while proc.poll() is None:
                with contextlib.suppress(KeyboardInterrupt):
                    proc.wait()
            raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return bool(stopped)


def _ranks_result(
    spec: RunSpec, resume: str | None, uri: str, folder: Path, nproc: int, returncode: int, stopped: bool
) -> RunResult:
    """The run's result from what its ranks wrote (``rank_R.json``): rank 0's run, status and
    reason. A run that did not finish is FAILED with the first cause: a rank that wrote nothing
    (it died), else the rank that failed first (the others were stopped after it); the run is
    marked FAILED with that reason unless it is rank 0's own (its trainer has marked it so)."""
    from core.train import TrainResult

    got: dict[int, dict] = {}
    for rank in range(nproc):
        with contextlib.suppress(OSError, ValueError):
            got[rank] = json.loads((folder / RANK_FILE.format(rank=rank)).read_text())
    head = got.get(0)
    run_id = (head or {}).get("run_id") or resume
    if head is not None and head["status"] == FINISHED:
        return RunResult(spec.key, spec.label, run_id, FINISHED, train=TrainResult(**head["train"]))
    if stopped:  # SIGTERM, passed on: rank 0 has checkpointed and marked its run KILLED (or failed)
        status = head["status"] if head is not None else KILLED
        return RunResult(spec.key, spec.label, run_id, status, (head or {}).get("reason") or "stopped (SIGTERM)")
    dead = [r for r in range(nproc) if r not in got]
    failed = [r for _, r in sorted((res["ended"], r) for r, res in got.items() if res["status"] == FAILED)]
    if dead:
        reason = f"rank {dead[0]} of {nproc} died without a result (torchrun exit code {returncode})"
    elif failed and failed[0] == 0:  # rank 0's own error: its trainer has marked the run with it
        return RunResult(spec.key, spec.label, run_id, FAILED, head["reason"])
    elif failed:  # the rank that failed first (the others stopped after it)
        reason = f"rank {failed[0]} of {nproc} failed: {got[failed[0]]['reason']}"
    else:
        reason = f"torchrun ended with exit code {returncode} ({head['status']}: {head['reason']})"
    if run_id is None:  # rank 0 died, or failed before it knew its run id: the run, found by its key
        runs = _runs_of(spec.key, uri)
        run_id = runs[0].run_id if runs and runs[0].status != FINISHED else None
    # Also over rank 0's own FAILED mark: its error (a broken collective) follows from the first cause.
    if run_id is not None and not _mark_failed(run_id, reason, uri):
        reason = f"{reason}; its run could not be marked FAILED"
    return RunResult(spec.key, spec.label, run_id, FAILED, reason)


def rank_main(folder: Path) -> int:
    """One rank of a ``--nproc-per-run`` run (``python -m experiments.torchrun_spec FOLDER`` under
    torchrun): train the spec of ``FOLDER/job.json`` as every back end does, write ``rank_R.json``
    (run id on rank 0, status, reason, the trainer's result); exit 0 when it FINISHED, 143 when
    stopped by SIGTERM, 1 when it failed (torchrun then stops the other ranks)."""
    job = json.loads((folder / JOB_FILE).read_text())
    fields = job["spec"]
    init = fields.get("init_from")
    spec = RunSpec(**{**fields, "init_from": None if init is None else (str(init[0]), int(init[1]))})
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = _train_spec(spec, job["resume"], job["uri"], "rank", progress=bool(job["progress"]) and rank == 0)
    except KeyboardInterrupt:  # Ctrl-C, passed on: the trainer has marked the run FAILED (interrupted)
        result = RunResult(spec.key, spec.label, job["resume"], FAILED, "interrupted (KeyboardInterrupt)")
    except BaseException:
        _leave_group()
        raise
    # Once another rank has died, torchrun sends this one SIGTERM: it must not cut the record of how this
    # rank ended (without it, a rank that failed looks like one that died, and the first cause is lost).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = {
        "rank": rank,
        "run_id": result.run_id or None,
        "status": result.status,
        "reason": result.reason,
        "ended": time.time(),
        "train": None if result.train is None else dataclasses.asdict(result.train),
    }
    path = folder / RANK_FILE.format(rank=rank)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(out))
    partial.replace(path)
    _leave_group()
    return {FINISHED: 0, KILLED: 128 + signal.SIGTERM}.get(result.status, 1)


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- progress


class _Progress:
    """One bar over runs on a terminal (done / total, running now, ETA); a line per finished run."""

    def __init__(self, total: int, done: int, desc: str, bar: bool) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(
            total=total,
            initial=done,
            desc=desc,
            unit="run",
            position=0,
            disable=not bar,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self.n, self.total = done, total

    def running(self, labels: Sequence[str]) -> None:
        self.bar.set_postfix_str(", ".join(labels)[:120] if labels else "")

    def finished(self, result: RunResult) -> None:
        self.n += 1
        self._tqdm.write(f"[{self.n}/{self.total}] {result.line()}", file=sys.stderr)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- back ends


def _serial(specs, todo, uri, progress, report, nproc=1) -> None:
    while todo:  # ``todo`` grows as runs finish when run_specs has ``then``
        i = next(iter(todo))
        resume = todo.pop(i)
        progress.running([specs[i].label])
        report(i, train_spec(specs[i], resume, uri, where="here", nproc=nproc))


def _submit(pool, queue, specs, uri, futures, nproc=1) -> set:
    """Submit what ``queue`` holds to ``pool`` (taking it out of the queue); the new futures. A pool
    that broke meanwhile takes nothing: the rest stays queued for the next pool."""
    from concurrent.futures.process import BrokenProcessPool

    new = set()
    while queue:
        i = next(iter(queue))
        try:
            f = pool.submit(train_spec, specs[i], queue[i], uri, nproc=nproc)
        except BrokenProcessPool:
            break
        del queue[i]
        futures[f] = i
        new.add(f)
    return new


def _local(specs, todo, uri, workers, progress, report, nproc=1) -> None:
    """A spawn-context process pool of ``workers`` processes (started as work arrives), fed from
    ``todo`` as it grows (with ``nproc`` > 1 each worker runs torchrun for its run). When a worker
    dies the pool breaks: the other workers are stopped with SIGTERM (their trainers checkpoint and
    mark their runs KILLED); those, and runs that had not started, go to a new pool, once; the run
    whose worker died is FAILED."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    queue, retried = todo, set()
    while queue:
        pool = ProcessPoolExecutor(
            max_workers=workers,
            initializer=_pool_worker,
            initargs=(workers * nproc,),
            mp_context=multiprocessing.get_context("spawn"),
        )
        futures: dict = {}
        broken, pending = [], _submit(pool, queue, specs, uri, futures, nproc)
        try:
            while pending:
                progress.running([specs[futures[f]].label for f in pending if f.running()])
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for f in done:
                    try:
                        report(futures[f], f.result())
                    except BrokenProcessPool:
                        broken.append(futures[f])
                if not broken:  # runs that ``then`` added as these finished
                    pending |= _submit(pool, queue, specs, uri, futures, nproc)
        except KeyboardInterrupt:
            _stop_workers(pool)
            for f in pending:
                _settle(specs[futures[f]], uri, "interrupted (Ctrl-C)")
            raise
        pool.shutdown(wait=True)
        for i in broken:
            settled = _settle(specs[i], uri, f"{WORKER_DIED} (the process pool broke)")
            if settled is not None and settled.status in (FINISHED, FAILED):
                report(i, settled)
            elif i in retried:
                report(i, settled or RunResult(specs[i].key, specs[i].label, None, FAILED, WORKER_DIED))
            else:  # KILLED by the pool's SIGTERM: resumed; not started: started
                retried.add(i)
                queue[i] = None if settled is None else _resumable(settled.run_id, uri)


def _stop_workers(pool) -> None:
    """Ctrl-C: no new runs; SIGTERM to every worker (each trainer checkpoints, marks its run
    KILLED and its process ends), then wait for them."""
    pool.shutdown(wait=False, cancel_futures=True)
    children = multiprocessing.active_children()
    for p in children:
        p.terminate()
    for p in children:
        p.join(timeout=120)


def _check_ray_address(address: str) -> None:
    """A HOST:PORT that does not answer: say so now (Ray itself retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise LayerLockError(f"--ray-address must be auto or HOST:PORT, got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise LayerLockError(
            f"no Ray cluster answers at {address} ({err.strerror or type(err).__name__}); "
            "start one with `ray start --head` or pass --ray-address"
        ) from None


def connect_ray(address: str | None, uri: str) -> bool:
    """Join (or start, without ``address``) a Ray cluster; returns whether this call started Ray.

    Raises LayerLockError when no cluster answers at ``address``, and for a sqlite (or file) store
    with a cluster on more than one host: workers elsewhere cannot write to this machine's file."""
    import ray

    started = False
    if not ray.is_initialized():
        if address not in (None, "auto"):
            _check_ray_address(address)
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
                configure_logging=True,
            )
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise LayerLockError(f"no Ray cluster at --ray-address {address}: {first_line(err)}") from None
        started = True
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    from core.tracking import sqlite_path

    if len(hosts) > 1 and (sqlite_path(uri) is not None or uri.startswith("file:")):
        if started:
            ray.shutdown()
        raise LayerLockError(
            f"the Ray cluster spans {len(hosts)} hosts, but the tracking store {uri} is a file on "
            f"this one; log to {TEAM_SERVER}"
        )
    return started


def _ray(specs, todo, uri, progress, report, nproc=1) -> None:
    import ray
    from ray.exceptions import RayError, TaskCancelledError

    from core.tracking import runs_root

    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    # One host: workers use this process's run folders and code, wherever Ray started them.
    env = (
        {
            "env_vars": {
                "LAYERLOCK_RUNS_DIR": str(runs_root()),
                "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p),
                **{k: os.environ[k] for k in (SENDER_ENV,) if k in os.environ},
            }
        }
        if len(hosts) == 1
        else None
    )
    remote = ray.remote(train_spec)
    refs = {}

    def submit() -> list:
        new = []
        while todo:  # ``todo`` grows as runs finish when run_specs has ``then``
            i = next(iter(todo))
            # N processes a run: N times what one asks for, on one node (torchrun --standalone)
            opts = {"num_cpus": specs[i].num_cpus * nproc, "num_gpus": specs[i].num_gpus * nproc, "max_retries": 0}
            if env is not None:
                opts["runtime_env"] = env
            ref = remote.options(**opts).remote(specs[i], todo.pop(i), uri, where="ray", nproc=nproc)
            refs[ref] = i
            new.append(ref)
        return new

    try:
        pending = submit()
        while pending:
            progress.running([specs[refs[r]].label for r in pending][:8])
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                i = refs[ref]
                try:
                    report(i, ray.get(ref))
                except (RayError, TaskCancelledError) as err:  # WorkerCrashedError, a lost node, ...
                    reason = f"{WORKER_DIED} ({type(err).__name__})"
                    report(
                        i,
                        _settle(specs[i], uri, reason) or RunResult(specs[i].key, specs[i].label, None, FAILED, reason),
                    )
            pending += submit()
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref)  # KeyboardInterrupt inside the task: the trainer marks its run and stops
        ray.wait(list(refs), num_returns=len(refs), timeout=120)
        raise


# ----------------------------------------------------------------------------- the one entry point


def run_specs(
    specs: Sequence[RunSpec],
    *,
    executor: str = DEFAULT_EXECUTOR,
    workers: int | None = None,
    ray_address: str | None = None,
    nproc_per_run: int = 1,
    uri: str | None = None,
    desc: str = "runs",
    progress: bool | None = None,
    on_result: Callable[[RunResult], None] | None = None,
    raise_failed: bool = True,
    then: Callable[[RunSpec, RunResult], Sequence[RunSpec]] | None = None,
) -> list[RunResult]:
    """Train every spec not FINISHED before; one :class:`RunResult` per spec, in their order.

    ``progress``: the bar over runs (default: when stderr is a terminal); a line per finished run
    is written either way. ``on_result`` is called as each run ends. ``then(spec, result)``, called
    when a spec has FINISHED (here or before), returns the specs that depend on it (a baseline's
    freeze-test children): they join the same set at once, so they train while the rest of the set
    still does (no stage waits for its slowest run); their results follow the given specs', in the
    order they were added. An error raised by ``then`` stops adding runs; the runs training finish
    and the error is raised. ``nproc_per_run``: processes each run trains as (torchrun, DDP).
    Raises LayerLockError for bad options, and :class:`RunsFailed` (after every run has ended)
    when some did not finish, unless ``raise_failed`` is False.
    """
    from core.tracking import absolute_uri, resolve_uri

    check_options(executor, workers, nproc_per_run)
    specs = list(specs)
    if len({s.key for s in specs}) != len(specs):
        raise LayerLockError("run_specs: two specs have one key (their identifying tags are equal)")
    uri = absolute_uri(resolve_uri(uri))  # workers may start in other folders
    started = False  # Ray, when this call starts or joins it (and so shuts it down)
    if executor == "ray" and ray_address is not None:
        started = connect_ray(ray_address, uri)  # a cluster that is not there: refused before anything
    _open_store(uri)
    done, todo = _plan(specs, uri)  # ``todo``: what the back end has still to start; ``then`` adds to it
    results: dict[int, RunResult] = dict(done)
    bar = _Progress(len(specs), 0, desc, sys.stderr.isatty() if progress is None else progress)
    errors: list[BaseException] = []  # raised by ``then``

    def grow(i: int, result: RunResult) -> None:
        """The specs that ``then`` says depend on ``specs[i]``, planned and added to the set."""
        if then is None or result.status != FINISHED or errors:
            return
        try:
            new = list(then(specs[i], result))
            if len({s.key for s in specs} | {s.key for s in new}) != len(specs) + len(new):
                raise LayerLockError("run_specs: a spec from `then` has the key of another one")
            first = len(specs)
            specs.extend(new)
            new_done, new_todo = _plan(new, uri)
        except Exception as err:
            errors.append(err)
            return
        bar.bar.total = bar.total = len(specs)
        todo.update({first + j: resume for j, resume in new_todo.items()})
        for j, res in sorted(new_done.items()):
            results[first + j] = res
            bar.finished(res)
            grow(first + j, res)

    def report(i: int, result: RunResult) -> None:
        if result.run_id is None and result.status != FINISHED:  # the run's id, for the list of failures
            settled = _settle(specs[i], uri, result.reason or WORKER_DIED)
            if settled is not None:
                result.run_id = settled.run_id
        results[i] = result
        bar.finished(result)
        if on_result is not None:
            on_result(result)
        grow(i, result)

    try:
        for i in sorted(done):
            bar.finished(done[i])
            grow(i, done[i])
        if todo:
            n = nproc_per_run
            if executor == "serial":
                _serial(specs, todo, uri, bar, report, n)
            elif executor == "local":
                _local(specs, todo, uri, workers or default_workers(n), bar, report, n)
            else:
                started = connect_ray(ray_address, uri) or started
                _ray(specs, todo, uri, bar, report, n)
    finally:
        bar.close()
        if started:
            import ray

            ray.shutdown()
    if errors:
        raise errors[0]
    out = [results[i] for i in range(len(specs))]
    if raise_failed and any(r.status != FINISHED for r in out):
        raise RunsFailed(out)
    return out
