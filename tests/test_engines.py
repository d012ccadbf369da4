"""One behaviour suite over both engines: what the loop and the engines share.

Each test runs on SQLite and on PostgreSQL (`database` in conftest), through
the public API: a behaviour that the two engines are meant to share is
checked once, so that the engines cannot drift apart on it. Tests of what is
one engine's own (placeholders, isolation levels, checkpoints) stay in that
engine's files.
"""

from __future__ import annotations

from typing import Any

import pytest

import mpwriter
from conftest import Database, Gate

INSERT = "INSERT INTO items(client, seq) VALUES (?, ?)"


def outcome(future: Any) -> Any:
    """A request's rowcount, "IntegrityError" (the engine's own class), or its error."""
    try:
        return future.result(timeout=30).rowcount
    except Exception as exc:
        return "IntegrityError" if isinstance(exc, mpwriter.IntegrityError) else exc


def test_a_batch_with_failures_answers_and_counts_each_request_once(
    database: Database, gate: Gate
) -> None:
    writer = database.writer
    writer.execute(INSERT, (1, 0))
    before: dict[str, Any] = dict(writer.stats())
    gate.hold(writer)  # what follows queues up and runs as one batch
    # seq 1 and 2 are new; seq 0 exists, and 1 and 2 come twice: 2 rows, 4 duplicates.
    inserts = [writer.submit(INSERT, (1, i % 3)) for i in range(1, 7)]
    refused = writer.submit("BEGIN")
    late = writer.submit(INSERT, (2, 1), timeout=0.2)
    with pytest.raises(mpwriter.Timeout):
        late.result(timeout=30)  # its caller gave up while the writer was held
    assert writer.post("INSERT INTO nowhere VALUES (1)")
    gate.release()
    assert gate.future.result(timeout=30) == "released"

    assert [outcome(f) for f in inserts] == [1, 1] + ["IntegrityError"] * 4
    with pytest.raises(mpwriter.StatementRefused):
        refused.result(timeout=30)
    assert database.count() == 3  # the failures spoiled none of the others
    stats: dict[str, Any] = dict(writer.stats())

    def added(name: str) -> int:
        return int(stats[name] - before[name])

    # The held call, six inserts, BEGIN and the post ran; the late one never did.
    assert added("requests") == 9
    assert added("commits") == 2  # the held call's batch, then theirs
    assert added("expired") == 1
    assert added("refused") == 1
    assert added("errors") == 6  # four duplicates, BEGIN, the failed post
    assert sum(stats["errors_by_class"].values()) == stats["errors"]
    assert stats["errors_by_class"]["StatementRefused"] == 1
    assert sum(stats["post_errors_by_class"].values()) == 1
    assert stats["posts_dropped"] == 0


def test_a_transaction_commits_whole_or_not_at_all(database: Database) -> None:
    writer = database.writer
    with writer.transaction() as tx:
        tx.execute(INSERT, (3, 1))
        tx.execute(INSERT, (3, 2))
    assert database.count() == 2

    def insert_a_duplicate() -> None:
        with writer.transaction() as tx:
            tx.execute(INSERT, (3, 3))
            tx.execute(INSERT, (3, 1))  # a duplicate: the whole transaction rolls back

    with pytest.raises(mpwriter.IntegrityError):
        insert_a_duplicate()
    assert database.count() == 2


def test_executemany_applies_every_row_or_none(database: Database) -> None:
    writer = database.writer
    assert writer.executemany(INSERT, [(4, i) for i in range(100)]).rowcount == 100
    with pytest.raises(mpwriter.IntegrityError):
        writer.executemany(INSERT, [(5, 1), (5, 2), (5, 1)])
    assert database.count() == 100


def test_stats_has_exactly_the_declared_figures(database: Database) -> None:
    database.writer.execute(INSERT, (6, 1))
    stats = database.writer.stats()
    assert set(stats) == set(mpwriter.Stats.__annotations__)
    assert stats["requests"] == stats["commits"] == 1
    assert 0 < stats["busy_seconds"] <= stats["uptime"]
