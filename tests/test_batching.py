"""Group commit: callers just answered share a costly commit (`WriterLoop._gather`).

A caller in a closed loop sends its next request a moment after its reply.
When a commit costs much (an fsync under FULL, a round trip to PostgreSQL),
the writer waits -- at most what a commit costs -- for the callers its last
batch answered, so that they share the next commit instead of each group
paying for its own. When commits cost next to nothing it never waits.

The engine here is a stand-in through `mpwriter.testing` (the fault seam):
it answers every request as an insert would and reports a commit cost of
its choosing, so the test decides whether commits are costly.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import select
import threading
from pathlib import Path
from typing import Any

import pytest

import mpwriter
from mpwriter import testing
from mpwriter._wire.frames import encode_wrote

CALLERS = 2
REQUESTS_EACH = 60


class CostedEngine:
    """Answers each request OK without a database, its commits "costing"
    ``commit_seconds``. A request whose SQL is "HOLD" writes a byte to
    ``held`` and blocks its batch until a byte comes on ``gate`` (pipes the
    forked writer inherits)."""

    commit_seconds = 0.0
    gate = -1
    held = -1

    def __init__(self, counters: Any) -> None:
        self._counters = counters

    def run(self, batch: list[Any]) -> list[tuple[Any, bytes]]:
        self._counters.batches += 1
        self._counters.requests += len(batch)
        if any(work.body[0] == "HOLD" for work in batch):
            os.write(self.held, b"h")
            os.read(self.gate, 1)
        return [(work.request, encode_wrote(work.request.request_id, 1, 1)) for work in batch]

    def run_alone(self) -> list[tuple[Any, bytes]]:
        return []

    def abandon_transaction(self) -> None:
        """No transaction is ever opened."""

    def tidy(self, idle: bool) -> None:
        """No upkeep."""

    def close(self) -> None:
        """Nothing to close."""


def costing(seconds: float, gate: int = -1, held: int = -1) -> type[CostedEngine]:
    fields = {"commit_seconds": seconds, "gate": gate, "held": held}
    return type("Costed", (CostedEngine,), fields)


def run_callers(writer: mpwriter.Writer) -> mpwriter.Stats:
    """CALLERS threads, each a closed loop of REQUESTS_EACH executes; the writer's stats."""
    failures: list[BaseException] = []

    def loop() -> None:
        try:
            for _ in range(REQUESTS_EACH):
                assert writer.execute("INSERT INTO t VALUES (1)").rowcount == 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=loop) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    return writer.stats()


@pytest.mark.parametrize("commit_seconds", [0.0, 20e-6])
def test_cheap_commits_never_wait(db_path: Path, commit_seconds: float) -> None:
    with testing.inject(engine=costing(commit_seconds)):
        writer = mpwriter.start(db_path, context="fork")
        try:
            stats = run_callers(writer)
        finally:
            writer.close()
    assert stats["requests"] >= CALLERS * REQUESTS_EACH
    assert (stats["gather_waits"], stats["gathered"]) == (0, 0)


def test_a_costly_commit_waits_for_the_callers_just_answered(db_path: Path) -> None:
    """B and C are answered together; D, sent next, waits for E, from the other slot."""
    gate_r, gate_w = os.pipe()
    held_r, held_w = os.pipe()
    try:
        # Commits "cost" a second: the wait is bounded by the writer's cap.
        with testing.inject(engine=costing(1.0, gate_r, held_w)):
            writer = mpwriter.start(db_path, context="fork")
        try:
            # A holds the writer, so that B and C queue up and form one batch.
            first = writer.submit("HOLD")
            assert select.select([held_r], [], [], 10)[0], "the writer never served HOLD"
            pair = [writer.submit("B"), writer.submit("C")]
            os.write(gate_w, b"x")
            for future in [first, *pair]:
                assert future.result(timeout=10).rowcount == 1
            # The pool lends the slots last given back first: D and E use the
            # slots of C and B, the callers the last batch answered.
            later = writer.submit("D")
            # D's batch waits for the other slot: no reply while E is not sent
            # (the writer waits up to 50 ms; a reply would take well under 5).
            with pytest.raises(concurrent.futures.TimeoutError):
                later.result(timeout=0.005)
            last = writer.submit("E")
            assert later.result(timeout=10).rowcount == 1
            assert last.result(timeout=10).rowcount == 1
            stats = writer.stats()
        finally:
            writer.close()
    finally:
        for fd in (gate_r, gate_w, held_r, held_w):
            os.close(fd)
    # A; B and C; then D waited for the other slot of that batch and shared
    # its commit with E.
    assert (stats["batches"], stats["requests"]) == (3, 5), stats
    # A's batch answered one caller: nothing to wait for after it; the wait
    # after B and C's ended when E came.
    assert (stats["gather_waits"], stats["gathered"]) == (1, 1), stats


def execute_one(writer: mpwriter.Writer, sql: str) -> None:
    """In a forked child: one request from another process (another caller)."""
    assert writer.execute(sql).rowcount == 1


def test_callers_taking_turns_one_at_a_time_never_wait(db_path: Path) -> None:
    """A quiet app: each batch answers one caller, who may not come back soon."""
    fork = multiprocessing.get_context("fork")
    with testing.inject(engine=costing(1.0)):
        writer = mpwriter.start(db_path, context="fork")
        try:
            assert writer.execute("A").rowcount == 1
            other = fork.Process(target=execute_one, args=(writer, "B"))  # another caller
            other.start()
            other.join(timeout=30)
            assert other.exitcode == 0
            assert writer.execute("C").rowcount == 1
            stats = writer.stats()
        finally:
            writer.close()
    assert (stats["batches"], stats["gather_waits"]) == (3, 0), stats


def test_one_stalled_commit_barely_moves_the_commit_cost() -> None:
    from mpwriter._writer.batch import commit_cost

    average = 0.0
    for _ in range(20):  # commits of 0.3 ms
        average = commit_cost(average, 0.0, 0.0003)
    assert average == pytest.approx(0.0003)
    stalled = commit_cost(average, 0.0, 0.131)  # one fsync that took 131 ms
    assert stalled <= 1.25 * average
    for _ in range(20):  # the disk stays slow: the average follows
        stalled = commit_cost(stalled, 0.0, 0.004)
    assert stalled == pytest.approx(0.004, rel=0.05)
