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


def test_a_costly_commit_waits_for_the_caller_just_answered(db_path: Path) -> None:
    """A is answered alone; B, queued meanwhile, waits for A's next request, C."""
    gate_r, gate_w = os.pipe()
    held_r, held_w = os.pipe()
    try:
        # Commits "cost" a second: the wait is bounded by the writer's cap.
        with testing.inject(engine=costing(1.0, gate_r, held_w)):
            writer = mpwriter.start(db_path, context="fork")
        try:
            first = writer.submit("HOLD")  # reply slot 1: its batch blocks on the gate
            assert select.select([held_r], [], [], 10)[0], "the writer never served HOLD"
            second = writer.submit("B")  # slot 2, queued behind it
            os.write(gate_w, b"x")
            assert first.result(timeout=10).rowcount == 1
            # Slot 1 is free again: C takes it, as the caller that A's was.
            third = writer.execute("C")
            assert third.rowcount == 1
            assert second.result(timeout=10).rowcount == 1
            stats = writer.stats()
        finally:
            writer.close()
    finally:
        for fd in (gate_r, gate_w, held_r, held_w):
            os.close(fd)
    # One batch for A; then B waited for slot 1's next request and shared its
    # commit. (Without the wait, B is served alone: three batches.)
    assert (stats["batches"], stats["requests"]) == (2, 3), stats
    # The wait ended when C came -- or there was none: the writer had not read
    # B before C was sent (it may be descheduled that long on a busy machine).
    assert stats["gathered"] == stats["gather_waits"] <= 1, stats
