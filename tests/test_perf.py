"""core.perf: the batch prefetcher gives exactly the batch of the step asked for, in any order."""

from __future__ import annotations

import platform
import threading

import pytest

from core.perf import Prefetcher, keep_freed_memory, spare_core


@pytest.mark.parametrize("background", [True, False])
def test_prefetcher_returns_the_batch_of_the_step_asked_for(background: bool) -> None:
    threads: set[str] = set()

    def make(step: int) -> tuple[int, int]:
        threads.add(threading.current_thread().name)
        return step, step * step

    batches = Prefetcher(make, background=background)
    order = [0, 1, 2, 2, 7, 3, 4, 0]  # in order, repeated (calibration), skipped ahead, back
    assert [batches.get(s) for s in order] == [make(s) for s in order]
    batches.close()
    assert any(name.startswith("layerlock-batches") for name in threads) == background


def test_spare_core_and_allocator() -> None:
    assert spare_core("cuda", 64) and not spare_core("cpu", 10_000)
    glibc = platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc and keep_freed_memory() is glibc  # mallopt is glibc's; idempotent


def test_spare_core_counts_the_processes_sharing_the_cores(monkeypatch) -> None:
    """A local executor's workers each run one torch thread; with as many workers as cores, no core
    is spare for a batch thread or background probes, though each worker alone would leave one."""
    import os

    from core.perf import SHARING_ENV

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv(SHARING_ENV, raising=False)
    assert spare_core("cpu", 1) == (cores > 1)
    monkeypatch.setenv(SHARING_ENV, str(cores))
    assert not spare_core("cpu", 1)
    monkeypatch.setenv(SHARING_ENV, "not a number")
    assert spare_core("cpu", 1) == (cores > 1)
