"""The PostgreSQL engine against a real server: the same API as on SQLite.

The server comes from the `pg_url` fixture (conftest): a database created
for this test run and dropped after it. Without a server these tests skip
(and fail in CI).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpwriter
from conftest import PG_SCHEMA, Gate, pg_count, rowcounts_or_duplicate
from mpwriter._writer.pg_sql import translate

psycopg = pytest.importorskip("psycopg", reason="PostgreSQL tests: psycopg is not installed")

INSERT = "INSERT INTO items(client, seq) VALUES (?, ?)"


# -- the API, one method at a time ------------------------------------------------


def test_execute_takes_qmark_and_named_placeholders_and_literal_percent(
    pg_writer: mpwriter.Writer, pg_fresh: str
) -> None:
    assert pg_writer.execute(INSERT, (1, 1)) == mpwriter.Result(1, None, [])
    result = pg_writer.execute(
        "INSERT INTO items(client, seq, payload) VALUES (:c, :s, '100%') RETURNING id, payload",
        {"c": 1, "s": 2},
    )
    assert result.rowcount == 1
    assert result.lastrowid is None  # PostgreSQL: use RETURNING
    assert result.rows[0][1] == "100%"
    assert result.columns == ("id", "payload")
    assert result.dicts()[0]["payload"] == "100%"
    rows = pg_writer.execute(
        "SELECT seq FROM items WHERE payload LIKE '10%' AND client = ?", (1,)
    ).rows
    assert rows == [(2,)]
    assert pg_count(pg_fresh) == 2


def test_native_sql_reaches_psycopg_untouched(pg_writer: mpwriter.Writer) -> None:
    # jsonb's ? operator would read as a placeholder; native SQL takes psycopg's %s.
    rows = pg_writer.execute(mpwriter.native("SELECT %s::jsonb ? 'k'"), ('{"k": 1}',)).rows
    assert rows == [(True,)]
    # Without parameters psycopg reads no placeholder: a lone % is just a character.
    assert pg_writer.execute(mpwriter.native("SELECT '100%'")).rows == [("100%",)]
    assert pg_writer.execute("SELECT '100%'", None).rows == [("100%",)]


def test_executemany_and_executescript(pg_writer: mpwriter.Writer, pg_fresh: str) -> None:
    assert pg_writer.executemany(INSERT, [(2, i) for i in range(50)]).rowcount == 50
    pg_writer.executescript(
        """
        CREATE TABLE notes (body TEXT);  -- a comment; with a semicolon
        INSERT INTO notes VALUES ('a;b'), ($$c;'d$$);
        CREATE FUNCTION one() RETURNS int LANGUAGE sql AS $f$ SELECT 1; $f$;
        """
    )
    assert pg_count(pg_fresh) == 50
    with mpwriter.reader(pg_fresh) as conn:
        assert conn.execute("SELECT body FROM notes ORDER BY body").fetchall() == [
            ("a;b",),
            ("c;'d",),
        ]
        assert conn.execute("SELECT one()").fetchone() == (1,)


def test_transaction_is_atomic(pg_writer: mpwriter.Writer, pg_fresh: str) -> None:
    with pg_writer.transaction() as tx:
        tx.execute(INSERT, (3, 1))
        tx.executemany(INSERT, [(3, 2), (3, 3)])
    assert pg_count(pg_fresh) == 3

    def half_duplicate() -> None:
        with pg_writer.transaction() as tx:
            tx.execute(INSERT, (3, 4))
            tx.execute(INSERT, (3, 1))  # duplicate: the whole block is rolled back

    with pytest.raises(mpwriter.IntegrityError):
        half_duplicate()
    assert pg_count(pg_fresh) == 3


def read_modify_write(conn: Any, client: int) -> tuple[int, bool, bool]:
    """A call() target: reads, writes, and checks what the wrapper offers."""
    conn.execute(INSERT, (client, 1))
    count = conn.execute("SELECT count(*) FROM items WHERE client = ?", (client,)).fetchone()[0]
    native_ok = conn.native.execute("SELECT 1").fetchone() == (1,)
    return count, native_ok, conn.execute("SELECT 1").lastrowid is None


def commit_inside(conn: Any) -> None:
    conn.execute(INSERT, (4, 1))
    conn.commit()


def begin_inside(conn: Any) -> None:
    conn.execute("BEGIN")


def test_call_gets_a_connection_wrapper(pg_writer: mpwriter.Writer, pg_fresh: str) -> None:
    assert pg_writer.call(read_modify_write, 5) == (1, True, True)
    with pytest.raises(mpwriter.StatementRefused):
        pg_writer.call(commit_inside)
    with pytest.raises(mpwriter.StatementRefused):
        pg_writer.call(begin_inside)
    assert pg_count(pg_fresh) == 1  # the refused call's insert was rolled back


@pytest.mark.parametrize(
    "statement",
    ["COMMIT", "begin", "/* x */ ROLLBACK", "SAVEPOINT a", "RELEASE a", "START TRANSACTION"],
)
def test_transaction_control_is_refused(pg_writer: mpwriter.Writer, statement: str) -> None:
    with pytest.raises(mpwriter.StatementRefused):
        pg_writer.execute(statement)
    with pytest.raises(mpwriter.StatementRefused):
        pg_writer.executescript(f"SELECT 1; {statement};")


def test_submit_aexecute_post_stats(pg_writer: mpwriter.Writer, pg_fresh: str) -> None:
    futures = [pg_writer.submit(INSERT, (6, i)) for i in range(40)]
    assert all(f.result(timeout=30).rowcount == 1 for f in futures)

    async def main() -> list[int]:
        results = await asyncio.gather(*(pg_writer.aexecute(INSERT, (7, i)) for i in range(10)))
        return [r.rowcount for r in results]

    assert asyncio.run(main()) == [1] * 10
    assert pg_writer.post(INSERT, (8, 1))
    pg_writer.execute("SELECT 1")  # the post was sent first: it is committed now
    assert pg_count(pg_fresh) == 51
    stats = pg_writer.stats()
    assert stats["requests"] >= 52
    assert stats["commits"] >= 1
    assert stats["batches"] <= stats["requests"]


# -- errors -------------------------------------------------------------------------


def test_errors_are_psycopg_classes_and_mpwriter_classes(pg_writer: mpwriter.Writer) -> None:
    pg_writer.execute(INSERT, (9, 1))
    with pytest.raises(psycopg.errors.UniqueViolation) as caught:
        pg_writer.execute(INSERT, (9, 1))
    error = caught.value
    assert isinstance(error, mpwriter.IntegrityError)
    assert isinstance(error, psycopg.IntegrityError)
    assert error.sqlstate == "23505"
    assert "duplicate key value violates unique constraint" in str(error)
    assert error.diag.constraint_name == "items_client_seq_key"
    assert isinstance(pickle.loads(pickle.dumps(error)), mpwriter.IntegrityError)
    with pytest.raises(mpwriter.ProgrammingError) as missing:
        pg_writer.execute("INSERT INTO no_such_table VALUES (1)")
    assert missing.value.sqlstate == "42P01"
    with pytest.raises(mpwriter.DatabaseError):
        pg_writer.execute("SELECT ?, :a", (1,))  # mixed placeholder styles


def test_unpicklable_psycopg_error_keeps_class_sqlstate_and_message() -> None:
    from mpwriter._writer.postgres import sendable

    error = psycopg.errors.UniqueViolation("duplicate key")
    error.unpicklable = lambda: None  # type: ignore[attr-defined]
    copy = pickle.loads(pickle.dumps(sendable(error)))
    assert type(copy) is psycopg.errors.UniqueViolation
    assert copy.sqlstate == "23505"
    assert str(copy) == "duplicate key"


def test_a_failed_request_does_not_spoil_its_batch(
    pg_writer: mpwriter.Writer, pg_fresh: str, gate: Gate
) -> None:
    pg_writer.execute(INSERT, (10, 0))
    gate.hold(pg_writer)  # the next requests queue up and run as one batch
    futures = [pg_writer.submit(INSERT, (10, i % 5)) for i in range(1, 9)]
    # seq 0 exists; seq 1..4 appear twice: 8 requests, 4 commit, 4 fail.
    gate.release()
    assert gate.future.result(timeout=30) == "released"
    outcomes = rowcounts_or_duplicate(futures, mpwriter.IntegrityError, timeout=30)
    assert outcomes == [1, 1, 1, 1, "duplicate", "duplicate", "duplicate", "duplicate"]
    assert pg_count(pg_fresh) == 5
    assert pg_writer.stats()["replayed_batches"] >= 1


def test_runs_of_one_statement_in_a_batch_answer_each_its_own(
    pg_writer: mpwriter.Writer, pg_fresh: str, gate: Gate
) -> None:
    # Consecutive requests of one SQL text go to the server together: each
    # must still get its own rowcount and rows, in order, with the runs
    # broken by other statements and by requests without parameters.
    for seq in range(6):
        pg_writer.execute(INSERT, (20, seq))
    update = "UPDATE items SET payload = 'u' WHERE client = ? AND seq <= ?"
    returning = "INSERT INTO items(client, seq) VALUES (?, ?) RETURNING seq * 10"
    gate.hold(pg_writer)
    futures = [pg_writer.submit(update, (20, bound)) for bound in (0, 3, -1, 5, 1)]
    futures += [pg_writer.submit(returning, (21, seq)) for seq in range(5)]
    futures.append(pg_writer.submit("SELECT count(*) FROM items WHERE client = 21"))
    futures += [pg_writer.submit(returning, (22, seq)) for seq in range(3)]  # a short run
    gate.release()
    assert gate.future.result(timeout=30) == "released"
    results = [future.result(timeout=30) for future in futures]
    assert [r.rowcount for r in results[:5]] == [1, 4, 0, 6, 2]
    assert [r.rows for r in results[5:10]] == [[(seq * 10,)] for seq in range(5)]
    assert results[10].rows == [(5,)]
    assert [r.rows for r in results[11:]] == [[(seq * 10,)] for seq in range(3)]
    assert pg_count(pg_fresh) == 14


def test_a_batch_past_64_requests_commits_once(
    pg_writer: mpwriter.Writer, pg_fresh: str, gate: Gate
) -> None:
    # Without savepoints the fast path needs no chunks of 64 (the
    # subtransaction cache): a batch of 100 inserts is one transaction.
    commits = pg_writer.stats()["commits"]
    gate.hold(pg_writer)
    futures = [pg_writer.submit(INSERT, (30, seq)) for seq in range(100)]
    gate.release()
    assert gate.future.result(timeout=30) == "released"
    assert [future.result(timeout=30).rowcount for future in futures] == [1] * 100
    stats = pg_writer.stats()
    assert stats["commits"] - commits == 2, stats  # the gate's batch, then the 100
    assert pg_count(pg_fresh) == 100


def test_a_failure_in_a_batch_past_64_requests_is_its_own(
    pg_writer: mpwriter.Writer, pg_fresh: str, gate: Gate
) -> None:
    # Replayed with a savepoint per request, at most 64 to a transaction.
    pg_writer.execute(INSERT, (31, 70))
    gate.hold(pg_writer)
    futures = [pg_writer.submit(INSERT, (31, seq)) for seq in range(100)]
    gate.release()
    assert gate.future.result(timeout=30) == "released"
    outcomes = rowcounts_or_duplicate(futures, mpwriter.IntegrityError, timeout=30)
    assert outcomes == [1] * 70 + ["duplicate"] + [1] * 29
    assert pg_count(pg_fresh) == 100


def flaky_serialization(conn: Any, marker: str) -> int:
    """Fails with a real 40001 from the server on its first run, succeeds after."""
    conn.execute(INSERT, (11, 1))
    if not os.path.exists(marker):
        Path(marker).write_text("ran once")  # outside the database: counts runs
        conn.execute(
            "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$"
        )
    return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])


def test_serialization_failure_replays_the_batch(
    pg_writer: mpwriter.Writer, pg_fresh: str, tmp_path: Path
) -> None:
    retries = pg_writer.stats()["retries"]
    assert pg_writer.call(flaky_serialization, str(tmp_path / "marker")) == 1
    assert pg_count(pg_fresh) == 1  # the first run's insert was rolled back
    assert pg_writer.stats()["retries"] == retries + 1


def test_serializable_isolation_option(pg_fresh: str) -> None:
    with mpwriter.start(
        pg_fresh, init=PG_SCHEMA, context="fork", isolation="serializable"
    ) as writer:
        level = writer.execute("SHOW transaction_isolation").rows
    assert level == [("serializable",)]
    with pytest.raises(ValueError, match="isolation"):
        mpwriter.start(pg_fresh, isolation="chaos")


def test_default_isolation_is_read_committed(pg_writer: mpwriter.Writer) -> None:
    assert pg_writer.execute("SHOW transaction_isolation").rows == [("read committed",)]


def test_reader_is_read_only(pg_writer: mpwriter.Writer, pg_fresh: str) -> None:
    pg_writer.execute(INSERT, (12, 1))
    with mpwriter.reader(pg_fresh) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (1,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO items(client, seq) VALUES (12, 2)")


def test_one_connection_per_writer(pg_writer: mpwriter.Writer, pg_fresh: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: pg_writer.execute(INSERT, (13, i)), range(200)))
    dbname = pg_fresh.rsplit("/", 1)[1]
    with mpwriter.reader(pg_fresh) as conn:
        connections = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = 'mpwriter'",
            (dbname,),
        ).fetchone()[0]
    assert connections == 1


# -- processes ----------------------------------------------------------------------


def attached_write(n: int) -> int:
    mpwriter.get_writer().execute(INSERT, (os.getpid(), n))
    return n


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_attach_across_processes(pg_fresh: str, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with (
        mpwriter.start(pg_fresh, init=PG_SCHEMA, context=method) as writer,
        concurrent.futures.ProcessPoolExecutor(
            max_workers=2, mp_context=ctx, initializer=mpwriter.attach, initargs=(writer,)
        ) as pool,
    ):
        assert sorted(pool.map(attached_write, range(30), timeout=60)) == list(range(30))
    assert pg_count(pg_fresh) == 30


def test_init_runs_and_a_failing_init_fails_start(pg_fresh: str) -> None:
    with pytest.raises(psycopg.errors.SyntaxError):
        mpwriter.start(pg_fresh, init="CREATE TABLEX nope", context="fork")
    with mpwriter.start(
        pg_fresh, init="CREATE TABLE IF NOT EXISTS extra (x int);", context="fork"
    ) as writer:
        assert writer.execute("INSERT INTO extra VALUES (?)", (1,)).rowcount == 1


def test_execution_limit_interrupts_long_sql(pg_fresh: str) -> None:
    with mpwriter.start(pg_fresh, init=PG_SCHEMA, context="fork", execution_limit=0.2) as writer:
        with pytest.raises(mpwriter.Interrupted, match="not applied"):
            writer.execute("SELECT pg_sleep(5)")  # sleep-ok: the long SQL the limit stops
        assert writer.execute(INSERT, (14, 1)).rowcount == 1  # and it serves on
    assert pg_count(pg_fresh) == 1


class CustomAbort(BaseException):
    """A BaseException that is no Exception, as some frameworks define."""


def insert_then_raise(conn: Any, kind: str) -> None:
    conn.execute(INSERT, (15, 1))
    raise {"SystemExit": SystemExit(3), "KeyboardInterrupt": KeyboardInterrupt()}.get(
        kind, CustomAbort("custom")
    )


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt", "CustomAbort"])
def test_a_call_raising_a_base_exception_rolls_back_alone(
    pg_writer: mpwriter.Writer, pg_fresh: str, kind: str
) -> None:
    pid = pg_writer.stats()["pid"]
    with pytest.raises(mpwriter.RemoteError, match=f"raised {kind}.*the writer serves on"):
        pg_writer.call(insert_then_raise, kind)
    assert pg_writer.execute(INSERT, (16, 1)).rowcount == 1
    assert pg_writer.stats()["pid"] == pid  # the same writer process serves on
    assert pg_count(pg_fresh) == 1  # the call's insert was rolled back


def spin_in_python(conn: Any, catch: bool) -> str:
    """Insert, then loop in Python, never calling the database again."""
    conn.execute(INSERT, (17, 1))
    while True:
        try:
            while True:
                pass
        except BaseException:
            if not catch:
                raise
            # A hostile function: it swallows the interruption and loops on.


@pytest.mark.parametrize("catch", [False, True], ids=["plain", "catches-the-interruption"])
def test_execution_limit_interrupts_python_in_a_call(pg_fresh: str, catch: bool) -> None:
    with mpwriter.start(
        pg_fresh, init=PG_SCHEMA, context="fork", execution_limit=0.3, watchdog_grace=1.0
    ) as writer:
        pid = writer.stats()["pid"]
        if catch:
            # Swallowing every interruption: it never returns by itself, and
            # the owner's watchdog ends the writer; the caller is told so.
            with pytest.raises((mpwriter.Interrupted, mpwriter.WriterCrashed)):
                writer.call_with_timeout(10, spin_in_python, True)
        else:
            with pytest.raises(mpwriter.Interrupted, match="not applied"):
                writer.call_with_timeout(10, spin_in_python, False)
            assert writer.stats()["pid"] == pid  # the writer served on
        assert writer.execute(INSERT, (18, 1)).rowcount == 1
    assert pg_count(pg_fresh) == 1  # only the insert after it


# -- the lexer, checked by the server ---------------------------------------------


LITERAL_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=20,
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(LITERAL_TEXT, LITERAL_TEXT)
def test_server_reads_literals_as_written_next_to_placeholders(
    pg_url: str, text: str, value: str
) -> None:
    quoted = "'" + text.replace("'", "''") + "'"
    dollar = "$q$" + text.replace("$", "") + "$q$"
    query, style = translate(f"SELECT {quoted}, ?, {dollar}, ?::text /* ? :x */ -- ?\n")
    assert style == "qmark"
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(query, (value, value)).fetchone()  # type: ignore[call-overload]
    assert row == (text, value, text.replace("$", ""), value)


def test_a_failed_commit_blames_only_its_culprit(pg_writer: mpwriter.Writer, gate: Gate) -> None:
    # A deferred foreign key is checked at COMMIT: the batch's COMMIT fails,
    # and the replay one request per transaction finds the culprit.
    pg_writer.executescript(
        """
        CREATE TABLE parent (id INT PRIMARY KEY);
        CREATE TABLE child (parent_id INT REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);
        INSERT INTO parent VALUES (1);
        """
    )
    gate.hold(pg_writer)
    futures = [
        pg_writer.submit("INSERT INTO child VALUES (?)", (parent,)) for parent in (1, 2, 1, 1)
    ]
    gate.release()
    assert gate.future.result(timeout=30) == "released"
    outcomes: list[object] = []
    for future in futures:
        try:
            outcomes.append(future.result(timeout=30).rowcount)
        except mpwriter.IntegrityError as exc:
            outcomes.append(exc.sqlstate)
    assert outcomes == [1, "23503", 1, 1]
    assert pg_writer.execute("SELECT count(*) FROM child").rows == [(3,)]


def commit_through_native(conn: Any) -> None:
    conn.execute(INSERT, (15, 1))
    conn.native.execute("COMMIT")


def test_a_commit_through_native_is_reported_as_outcome_unknown(
    pg_writer: mpwriter.Writer,
) -> None:
    with pytest.raises(mpwriter.OutcomeUnknown, match="ended the writer's transaction"):
        pg_writer.call(commit_through_native)
    # The writer reconnected and serves on, in transactions of its own.
    assert pg_writer.execute(INSERT, (15, 2)).rowcount == 1
    with pytest.raises(mpwriter.IntegrityError), pg_writer.transaction() as tx:  # noqa: PT012
        tx.execute(INSERT, (15, 3))
        tx.execute(INSERT, (15, 2))
    assert pg_writer.execute("SELECT count(*) FROM items WHERE seq = 3").rows == [(0,)]


def test_the_handle_shows_no_password(pg_fresh: str) -> None:
    # Trust authentication ignores the password; the handle must not show it.
    url = pg_fresh.replace("postgres@", "postgres:s3cret@", 1)
    with mpwriter.start(url, init=PG_SCHEMA, context="fork") as writer:
        assert "s3cret" not in repr(writer)
        assert "postgres:***@" in writer.path
        assert writer.execute(INSERT, (16, 1)).rowcount == 1


def increment_locked(conn: Any, key: str) -> int:
    """Read-modify-write under a row lock: safe with any number of writers."""
    (value,) = conn.execute(
        "SELECT value FROM counters WHERE key = ? FOR UPDATE", (key,)
    ).fetchone()
    conn.execute("UPDATE counters SET value = ? WHERE key = ?", (value + 1, key))
    return int(value) + 1


def test_two_writers_on_one_database_lose_no_update(pg_fresh: str) -> None:
    # Two owners (as on two machines) serve the same database at once.
    schema = PG_SCHEMA + "CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INT);"
    with (
        mpwriter.start(pg_fresh, init=schema, context="fork") as first,
        mpwriter.start(pg_fresh, init=schema, context="fork") as second,
    ):
        first.execute("INSERT INTO counters VALUES ('locked', 0), ('atomic', 0)")

        def work(writer: mpwriter.Writer) -> None:
            for _ in range(50):
                writer.call(increment_locked, "locked")
                writer.execute("UPDATE counters SET value = value + 1 WHERE key = 'atomic'")

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(work, [first, second, first, second]))
        rows = dict(first.execute("SELECT key, value FROM counters").rows)
    assert rows == {"locked": 200, "atomic": 200}


def test_vacuum_runs_alone_after_its_batch(pg_writer: mpwriter.Writer, gate: Gate) -> None:
    gate.hold(pg_writer)
    futures = [
        pg_writer.submit(INSERT, (17, 1)),
        pg_writer.submit("VACUUM items"),  # PostgreSQL refuses it inside a transaction
        pg_writer.submit(INSERT, (17, 2)),
    ]
    gate.release()
    assert gate.future.result(timeout=30) == "released"
    assert [f.result(timeout=30).rowcount for f in futures] == [1, -1, 1]
    with pytest.raises(psycopg.errors.ActiveSqlTransaction):
        pg_writer.executescript("VACUUM items;")


# -- streamed executemany ----------------------------------------------------------

STREAMED = 25_000  # several chunks of the streamed file (at most 10,000 rows each)


def test_a_streamed_generator_commits_whole(pg_writer: mpwriter.Writer, pg_fresh: str) -> None:
    rows = ((1, seq) for seq in range(STREAMED))
    assert pg_writer.executemany(INSERT, rows).rowcount == STREAMED
    assert pg_count(pg_fresh) == STREAMED
    with mpwriter.reader(pg_fresh) as conn:
        assert conn.execute("SELECT max(seq) FROM items").fetchone()[0] == STREAMED - 1


def test_a_bad_row_in_a_late_chunk_applies_no_row(
    pg_writer: mpwriter.Writer, pg_fresh: str
) -> None:
    def with_duplicate() -> Any:
        yield from ((1, seq) for seq in range(STREAMED))
        yield (1, 20_000)  # UNIQUE (client, seq): the batch's last chunk fails

    with pytest.raises(mpwriter.IntegrityError) as caught:
        pg_writer.executemany(INSERT, with_duplicate())
    assert isinstance(caught.value, psycopg.errors.UniqueViolation)
    assert pg_count(pg_fresh) == 0
    assert pg_writer.execute(INSERT, (2, 0)).rowcount == 1  # and the writer serves on
