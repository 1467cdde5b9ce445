"""Host-side costs of a training step that no FLOP count sees: memory pages and batch building.

Measured with ``python -m experiments bench profile`` (docs/performance.md):

- *Pages*: glibc serves every allocation above its mmap threshold (128 KiB to 32 MiB, adapting)
  with fresh pages from the kernel and returns them on free, so each step's activations fault
  in and zero their pages again: thousands of page faults per step on mae_tiny, a share of a
  deeply frozen step that grows as freezing shrinks the compute. :func:`keep_freed_memory` keeps
  freed memory in the process.
- *Batches*: a step's clips and masks are a pure function of ``(seed, step)``, so the next
  step's batch can be built in a background thread while this one trains (:class:`Prefetcher`),
  where a core is free for it (:func:`spare_core`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")

# Processes that share this machine's cores, each with its own torch threads (a local executor's
# pool sets it in every worker): a core is free only if all of them leave one.
SHARING_ENV = "LAYERLOCK_PROCESSES_SHARING_CORES"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
_kept = False
_lock = threading.Lock()


def keep_freed_memory() -> bool:
    """Tell glibc to serve large allocations from the heap and keep freed memory for reuse
    (``mallopt``), so a training loop stops paying page faults for its activations every step.

    Process-wide and idempotent; the resident size then stays at its peak instead of shrinking
    between steps. Returns False where there is no glibc (another libc, macOS, Windows).
    """
    global _kept
    with _lock:
        if _kept:
            return True
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name)
            mallopt = libc.mallopt
        except (OSError, AttributeError, TypeError):
            return False
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        # Recent glibc accepts any threshold; older ones refuse more than 32 MiB on 64-bit.
        mmap_ok = any(mallopt(_M_MMAP_THRESHOLD, size) for size in (2**30, _MMAP_THRESHOLD_MAX))
        _kept = mmap_ok and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
        return _kept


def spare_core(device_type: str, threads: int) -> bool:
    """Whether building batches in a background thread can overlap with the step: on a GPU the
    host is mostly idle; on CPU only when torch's intra-op threads leave a core free (a third
    thread on a fully used CPU only delays the OpenMP threads it preempts). ``$LAYERLOCK_PROCESSES_SHARING_CORES``
    (:data:`SHARING_ENV`, set by the local executor's workers) says how many processes of
    ``threads`` threads each share the cores."""
    if device_type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        sharing = max(1, int(os.environ.get(SHARING_ENV, "1")))
    except ValueError:
        sharing = 1
    return threads * sharing < cores


class Prefetcher(Generic[T]):
    """``get(step)`` returns ``make(step)`` and, with ``background``, starts building
    ``make(step + 1)`` in a background thread, so steps taken in order find their batch ready.
    ``make`` must be a pure function of the step (the trainer's batches are: indices and masks
    come from ``(seed, step)``); asking for another step than the one prefetched, or the same
    step again, still gives ``make(step)``. Without ``background`` it builds on demand.
    """

    def __init__(self, make: Callable[[int], T], background: bool = True) -> None:
        self._make = make
        self.background = background
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerlock-batches") if background else None
        self._ahead: tuple[int, Future[T]] | None = None
        self._last: tuple[int, T] | None = None

    def get(self, step: int) -> T:
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        ahead = self._ahead
        value = ahead[1].result() if ahead is not None and ahead[0] == step else self._make(step)
        self._last = (step, value)
        if self._pool is not None:
            self._ahead = (step + 1, self._pool.submit(self._make, step + 1))
        return value

    def close(self) -> None:
        """Stop the background thread (a batch being built is finished, then dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead = self._last = None
