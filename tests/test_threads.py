"""One handle shared by threads: each thread's calls get their own replies, in order.

The interpreter is made to switch threads as often as it can while they
share one handle (blocking calls, futures and transactions mixed), so that
the borrowing and returning of reply pipes interleave as much as they can.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import mpwriter

THREADS = 8
CALLS = 150


@pytest.fixture
def fast_switching() -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def test_threads_sharing_one_handle_each_get_their_own_replies(
    db_path: Path, fast_switching: None
) -> None:
    schema = "CREATE TABLE IF NOT EXISTS seen(thread INTEGER, n INTEGER)"
    failures: list[str] = []
    start = threading.Barrier(THREADS, timeout=30)
    with mpwriter.start(db_path, init=schema, timeout=30.0, context="fork") as writer:

        def one(thread: int) -> None:
            try:
                start.wait()
                for n in range(CALLS):
                    value = thread * 1_000_000 + n
                    if n % 3 == 0:
                        got = writer.execute("SELECT ?", (value,)).rows
                    elif n % 3 == 1:
                        got = writer.submit("SELECT ?", (value,)).result(timeout=30).rows
                    else:
                        with writer.transaction() as tx:
                            tx.execute("INSERT INTO seen VALUES (?, ?)", (thread, n))
                        got = [(value,)]
                    if got != [(value,)]:
                        failures.append(f"thread {thread} call {n} got {got}")
            except BaseException as exc:  # the outcome under test
                failures.append(f"thread {thread}: {exc!r}")

        threads = [threading.Thread(target=one, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive(), "a thread's call did not end in time"
        assert failures == []
        rows = writer.execute("SELECT thread, n FROM seen ORDER BY rowid").rows
    # Each thread's transactions committed once each, in the order it made them.
    for t in range(THREADS):
        assert [n for thread, n in rows if thread == t] == list(range(2, CALLS, 3))
