"""``bench integrations``' lock-step: two loops in two threads take turns one step at a time,
each loop's time is the sum of its own turns over the timed steps, and attach/close fall outside."""

from __future__ import annotations

import threading
import time

import pytest

from experiments.bench.timing import LockStep


def _loops(lock: LockStep, steps: int, step_s: tuple[float, float], attach_s: tuple[float, float] = (0.0, 0.0)):
    """Two fake loops: attach, ``steps`` steps of ``step_s[who]`` seconds each, close. Returns
    the log of (who, event) in order and whether two steps ever ran at once."""
    log: list[tuple[int, str]] = []
    running = [0]
    overlap = [False]
    guard = threading.Lock()

    def loop(who: int) -> None:
        time.sleep(attach_s[who])  # attach: untimed, may take longer in one loop
        for step in range(steps):
            lock.step_begins(who, step)
            with guard:
                running[0] += 1
                overlap[0] |= running[0] > 1
                log.append((who, f"step {step}"))
            time.sleep(step_s[who])
            with guard:
                running[0] -= 1
        lock.loop_ends(who, steps)
        with guard:
            log.append((who, "closed"))

    threads = [threading.Thread(target=loop, args=(who,)) for who in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return log, overlap[0]


def test_lockstep_alternates_and_times_each_loop_by_its_own_turns() -> None:
    lock = LockStep(skip=2, timed=6)
    log, overlap = _loops(lock, steps=9, step_s=(0.02, 0.01), attach_s=(0.0, 0.15))
    assert not overlap  # never two steps at once
    steps = [who for who, event in log if event.startswith("step")]
    assert steps == [0, 1] * 9  # strict turns, loop 0 first (lock.turn = 0)
    assert lock.steps == [6, 6]
    # each loop's time is its own steps' time: 6 x 20 ms against 6 x 10 ms, whatever the other
    # loop's attach cost (150 ms, before the first turn) or the waiting between turns
    assert lock.spent[0] == pytest.approx(0.12, rel=0.25) and lock.spent[1] == pytest.approx(0.06, rel=0.4)
    assert 1.5 < lock.spent[0] / lock.spent[1] < 2.6
    # neither loop closes while the other still steps
    first_close = min(i for i, (_, e) in enumerate(log) if e == "closed")
    assert first_close > max(i for i, (_, e) in enumerate(log) if e.startswith("step"))


def test_lockstep_first_turn_follows_the_setting() -> None:
    lock = LockStep(skip=0, timed=3)
    lock.turn = 1
    log, _ = _loops(lock, steps=4, step_s=(0.001, 0.001))
    assert [who for who, e in log if e.startswith("step")][:2] == [1, 0]


def test_lockstep_a_failed_loop_releases_the_other() -> None:
    lock = LockStep(skip=0, timed=3, timeout=10)
    raised: list[BaseException] = []

    def good() -> None:
        try:
            for step in range(5):
                lock.step_begins(1, step)
            lock.loop_ends(1, 5)
        except BaseException as err:  # noqa: BLE001 - what the test looks at
            raised.append(err)

    def bad() -> None:
        lock.step_begins(0, 0)
        lock.fail()  # the framework raised in its step

    t0 = time.perf_counter()
    threads = [threading.Thread(target=bad), threading.Thread(target=good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert time.perf_counter() - t0 < 5 and raised, "the surviving loop must stop, not wait for its turn"
