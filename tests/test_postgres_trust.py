"""PostgreSQL: no request changes the session of later ones, a lock wait holds nobody else.

Against the real server of the `pg_url` fixture, with outside psycopg
sessions where a test needs another client (a row lock, a deadlock).
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from typing import Any

import pytest

import mpwriter
from conftest import PG_SCHEMA, SCHEDULING_SLIP, Gate, pg_count

psycopg = pytest.importorskip("psycopg", reason="PostgreSQL tests: psycopg is not installed")

INSERT = "INSERT INTO items(client, seq) VALUES (?, ?)"


def _settings(writer: mpwriter.Writer) -> tuple[Any, ...]:
    """What the next request sees of the session."""
    rows = writer.execute(
        "SELECT current_setting('synchronous_commit'), current_setting('search_path'),"
        " current_setting('default_transaction_read_only'), current_user::text"
    ).rows
    return tuple(rows[0])


# -- item 6: the session -------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "SET synchronous_commit = off",
        "SET search_path = nowhere",
        "set default_transaction_read_only = on",
        "SET SESSION statement_timeout = 1",
        "/* a comment */ SET ROLE pg_monitor",
        "SET SESSION AUTHORIZATION DEFAULT",
        "RESET ALL",
        "DISCARD TEMP",
        "LISTEN channel",
        "PREPARE p AS SELECT 1",
    ],
)
def test_a_session_statement_is_refused_on_every_path(
    pg_writer: mpwriter.Writer, statement: str
) -> None:
    before = _settings(pg_writer)
    with pytest.raises(mpwriter.StatementRefused, match=r"SET LOCAL.*not applied"):
        pg_writer.execute(statement)
    with pytest.raises(mpwriter.StatementRefused, match="session"):
        pg_writer.executescript(f"SELECT 1; {statement}")
    with pytest.raises(mpwriter.StatementRefused):
        _in_transaction(pg_writer, ["SELECT 1", statement])
    with pytest.raises(mpwriter.StatementRefused):
        pg_writer.call(_run_wrapped, statement)
    assert _settings(pg_writer) == before
    pg_writer.execute(INSERT, (1, 1))


def _in_transaction(writer: mpwriter.Writer, statements: list[str]) -> None:
    with writer.transaction() as tx:
        for statement in statements:
            tx.execute(statement)


def _run_wrapped(conn: Any, statement: str) -> None:
    conn.execute(statement)


def test_set_local_constraints_and_transaction_pass() -> None:
    from mpwriter._writer.pg_sql import session_change

    for sql in (
        "SET LOCAL search_path = x",
        "SET CONSTRAINTS ALL DEFERRED",
        "SET TRANSACTION READ ONLY",
        "SELECT 'SET x = 1'",
        "PREPARE TRANSACTION 'x'",  # transaction control: refused elsewhere
    ):
        assert session_change(sql) is None, sql
    assert session_change("SELECT 1; SET x = 1") is not None


def test_set_local_works_within_its_request(pg_writer: mpwriter.Writer) -> None:
    with pg_writer.transaction() as tx:
        tx.execute("SET LOCAL search_path = pg_catalog")
        tx.execute("SELECT current_setting('search_path')")
    # The transaction's own statement saw it; the next request does not.
    assert _settings(pg_writer)[1] == '"$user", public'
    assert pg_writer.call(_set_local_and_read) == "pg_catalog"
    assert _settings(pg_writer)[1] == '"$user", public'


def _set_local_and_read(conn: Any) -> str:
    conn.execute("SET LOCAL search_path = pg_catalog")
    return str(conn.execute("SELECT current_setting('search_path')").fetchone()[0])


def test_set_local_ends_with_its_request_not_with_the_batch(
    pg_writer: mpwriter.Writer, gate: Gate
) -> None:
    default = _settings(pg_writer)[1]
    # One batch on the pipelined path: each request after a SET LOCAL runs
    # in the same transaction, yet sees the values as before it.
    gate.hold(pg_writer)
    first = pg_writer.submit_script(
        "SET LOCAL search_path = pg_catalog; /* why */ SET LOCAL ROLE pg_monitor;"
        " SET LOCAL TIME ZONE 'Asia/Tokyo'; SET LOCAL myapp.flag = 'on'"
    )
    after = pg_writer.submit(
        "SELECT current_setting('search_path'), current_user = session_user,"
        " current_setting('TimeZone') <> 'Asia/Tokyo', current_setting('myapp.flag', true)"
    )
    gate.release()
    assert gate.future.result(timeout=30) == "released"
    first.result(timeout=30)
    assert after.result(timeout=30).rows[0][:3] == (default, True, True)
    assert after.result(timeout=30).rows[0][3] in (None, "")
    # And on the isolated path, a call()'s SET LOCAL through its connection.
    gate.hold(pg_writer)
    inside = pg_writer.submit_call(_set_local_and_read)
    later = pg_writer.submit("SELECT current_setting('search_path')")
    gate.release()
    assert gate.future.result(timeout=30) == "released"
    assert inside.result(timeout=30) == "pg_catalog"
    assert later.result(timeout=30).rows == [(default,)]


def _native_set(conn: Any, statements: list[str]) -> str:
    for statement in statements:
        conn.native.execute(statement)
    return str(conn.native.execute("SHOW synchronous_commit").fetchone()[0])


UNSEEN = [
    "SELECT set_config('synchronous_commit', 'off', false)",
    "SELECT set_config('search_path', 'nowhere', false)",
    "SELECT set_config('default_transaction_read_only', 'on', false)",
]


def test_a_session_change_the_lexer_cannot_see_is_undone_after_its_batch(
    pg_writer: mpwriter.Writer, pg_fresh: str
) -> None:
    before = _settings(pg_writer)
    assert before[0] == "on"
    for statement in UNSEEN:
        pg_writer.execute(statement)  # accepted: its words say SELECT
        assert _settings(pg_writer) == before
        pg_writer.execute(INSERT, (2, len(statement)))
    # Through a call()'s psycopg connection, all at once, and SET ROLE too.
    inside = pg_writer.call(
        _native_set,
        [
            "SET synchronous_commit = off",
            "SET search_path = nowhere",
            "SET default_transaction_read_only = on",
            "SET ROLE pg_monitor",
        ],
    )
    assert inside == "off"  # the function saw its own change...
    assert _settings(pg_writer) == before  # ...no later request does
    pg_writer.execute(INSERT, (2, 1000))
    assert pg_count(pg_fresh) == len(UNSEEN) + 1


def test_a_batch_that_turns_synchronous_commit_off_still_commits_durably(
    pg_writer: mpwriter.Writer,
) -> None:
    # A deferred trigger runs inside COMMIT, just before the commit record is
    # written: it sees the synchronous_commit that decides whether COMMIT
    # waits for the WAL flush.
    pg_writer.executescript(
        "CREATE TABLE commit_seen(setting text);"
        " CREATE FUNCTION record_sync() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN INSERT INTO commit_seen VALUES (current_setting('synchronous_commit'));"
        " RETURN NULL; END $$;"
        " CREATE CONSTRAINT TRIGGER record_sync AFTER INSERT ON items"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION record_sync();"
    )
    with pg_writer.transaction() as tx:
        tx.execute("SELECT set_config('synchronous_commit', 'off', false)")
        tx.execute(INSERT, (3, 1))
    with pg_writer.transaction() as tx:
        tx.execute("SET LOCAL synchronous_commit = off")  # the whole batch's COMMIT
        tx.execute(INSERT, (3, 2))
    pg_writer.call(_native_set_then_insert)
    seen = pg_writer.execute("SELECT setting FROM commit_seen").rows
    assert seen == [("on",), ("on",), ("on",)]


def _native_set_then_insert(conn: Any) -> None:
    conn.native.execute("SET synchronous_commit = off")
    conn.execute(INSERT, (3, 3))


def test_init_session_settings_survive_the_reset(pg_fresh: str) -> None:
    init = PG_SCHEMA + (
        "CREATE SCHEMA IF NOT EXISTS app;"
        " CREATE TABLE IF NOT EXISTS app.things(x int);"
        " SET search_path = app, public;"
    )
    with mpwriter.start(pg_fresh, init=init, context="fork", timeout=10) as writer:
        writer.execute("INSERT INTO things VALUES (1)")  # app.things
        writer.execute("SELECT set_config('search_path', 'public', false)")
        writer.execute("INSERT INTO things VALUES (2)")  # app.things again
        assert writer.execute("SELECT count(*) FROM app.things").rows == [(2,)]
        assert writer.execute("SHOW search_path").rows == [("app, public",)]


# -- item 7: a request waiting on a lock --------------------------------------------


@pytest.mark.timeout(120)  # a 4 s lock wait while other callers write, then checks
def test_a_request_waiting_on_an_outside_lock_holds_nobody_else(
    pg_writer: mpwriter.Writer, pg_fresh: str
) -> None:
    row_id = pg_writer.execute("INSERT INTO items(client, seq) VALUES (7, 0) RETURNING id").rows[0][
        0
    ]
    outside = psycopg.connect(pg_fresh)  # not autocommit: holds its row lock
    try:
        outside.execute("SELECT * FROM items WHERE id = %s FOR UPDATE", (row_id,))
        sent = time.monotonic()
        blocked = pg_writer.submit(
            "UPDATE items SET payload = 'blocked' WHERE id = ?", (row_id,), timeout=4.0
        )
        stop = threading.Event()
        slowest: list[float] = []

        def write_other_rows(client: int) -> int:
            seq = 0
            worst = 0.0
            while not stop.is_set():
                started = time.monotonic()
                pg_writer.execute(INSERT, (100 + client, seq), timeout=2.0)
                worst = max(worst, time.monotonic() - started)
                seq += 1
            slowest.append(worst)
            return seq

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            writers = [pool.submit(write_other_rows, client) for client in range(4)]
            with pytest.raises(mpwriter.Interrupted) as caught:
                blocked.result(timeout=10)
            answered = time.monotonic() - sent
            stop.set()
            written = sum(future.result(timeout=30) for future in writers)
    finally:
        outside.rollback()
        outside.close()
    assert "not applied" in str(caught.value)
    assert answered < 4.0 + SCHEDULING_SLIP  # within its timeout
    # Every other caller was answered well within its own 2 s, many times over.
    assert written >= 20
    assert max(slowest) < 1.5, slowest
    assert pg_writer.execute("SELECT payload FROM items WHERE id = ?", (row_id,)).rows == [(None,)]
    assert pg_count(pg_fresh) == 1 + written


def test_a_request_gets_the_lock_once_the_outside_session_lets_go(
    pg_writer: mpwriter.Writer, pg_fresh: str
) -> None:
    row_id = pg_writer.execute("INSERT INTO items(client, seq) VALUES (8, 0) RETURNING id").rows[0][
        0
    ]
    outside = psycopg.connect(pg_fresh)
    requests = pg_writer.stats()["requests"]
    try:
        outside.execute("SELECT * FROM items WHERE id = %s FOR UPDATE", (row_id,))
        blocked = pg_writer.submit(
            "UPDATE items SET payload = 'done' WHERE id = ?", (row_id,), timeout=20.0
        )
        # Served while the update waits: it holds nobody.
        pg_writer.execute(INSERT, (8, 1), timeout=2.0)
        assert not blocked.done()
    finally:
        outside.rollback()
        outside.close()
    assert blocked.result(timeout=20).rowcount == 1
    # Tried again and again, counted once.
    assert pg_writer.stats()["requests"] == requests + 2
    assert pg_writer.execute("SELECT payload FROM items WHERE id = ?", (row_id,)).rows == [
        ("done",)
    ]


def test_a_table_lock_costs_a_batch_one_lock_wait_not_one_per_request(
    pg_writer: mpwriter.Writer, pg_fresh: str, gate: Gate
) -> None:
    pg_writer.execute("CREATE TABLE IF NOT EXISTS other(x int)")
    outside = psycopg.connect(pg_fresh)
    try:
        outside.execute("LOCK TABLE items IN EXCLUSIVE MODE")  # no writes to items
        gate.hold(pg_writer)  # one batch: 20 blocked requests, then 4 others
        blocked = [pg_writer.submit(INSERT, (40, seq), timeout=20.0) for seq in range(20)]
        others = [pg_writer.submit("INSERT INTO other VALUES (?)", (x,)) for x in range(4)]
        released = time.monotonic()
        gate.release()
        for future in others:
            future.result(timeout=10)
        # One pass waits 0.1 s on the lock in all, not 0.1 s for each of the 20
        # (2 s): the bound leaves the scheduler its slip and stays below that.
        assert time.monotonic() - released < 1.0 + SCHEDULING_SLIP
        assert not any(future.done() for future in blocked)
    finally:
        outside.rollback()
        outside.close()
    assert gate.future.result(timeout=10) == "released"
    assert [future.result(timeout=20).rowcount for future in blocked] == [1] * 20
    assert pg_count(pg_fresh) == 20


def test_nowait_fails_at_once_and_is_not_retried(pg_writer: mpwriter.Writer, pg_fresh: str) -> None:
    row_id = pg_writer.execute("INSERT INTO items(client, seq) VALUES (9, 0) RETURNING id").rows[0][
        0
    ]
    outside = psycopg.connect(pg_fresh)
    try:
        outside.execute("SELECT * FROM items WHERE id = %s FOR UPDATE", (row_id,))
        started = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            pg_writer.execute(
                "SELECT * FROM items WHERE id = ? FOR UPDATE NOWAIT", (row_id,), timeout=10
            )
        assert time.monotonic() - started < 5
    finally:
        outside.rollback()
        outside.close()


# -- what the docs claim: savepoints, deadlocks, counters ----------------------------


def test_one_savepoint_per_request_on_the_replay(
    pg_writer: mpwriter.Writer, pg_fresh: str, gate: Gate
) -> None:
    """Without a savepoint per request, the failed statement aborts the whole
    transaction and every innocent request after it fails too.
    """
    pg_writer.execute(INSERT, (20, 0))
    # A post that reports one dropped post (an unpicklable parameter).
    assert pg_writer.post(INSERT, (threading.Lock(), 0)) is False
    errors = pg_writer.stats()["errors"]
    gate.hold(pg_writer)
    futures = [pg_writer.submit(INSERT, (20, seq)) for seq in (1, 0, 2, 3)]
    assert pg_writer.post(INSERT, (20, 4)) is True  # reports the drop
    gate.release()
    assert gate.future.result(timeout=30) == "released"
    assert futures[0].result(timeout=30).rowcount == 1
    with pytest.raises(mpwriter.IntegrityError):
        futures[1].result(timeout=30)
    assert [f.result(timeout=30).rowcount for f in futures[2:]] == [1, 1]
    pg_writer.execute("SELECT 1")
    stats = pg_writer.stats()
    assert stats["replayed_batches"] >= 1
    # Counted once, though the batch ran twice (pipelined, then replayed).
    assert stats["errors"] == errors + 1
    assert stats["posts_dropped"] == 1
    assert pg_count(pg_fresh) == 5


def _lock_then(conn: Any, first: int, second: int, entered: str, go: str) -> str:
    """Lock row ``first``, say so, wait for the word, then lock ``second``.

    Its session detects a deadlock after 10 ms of waiting (the outside
    session after 10 s), so that the server picks the writer as the victim.
    """
    import os as _os

    conn.execute("SET LOCAL deadlock_timeout = '10ms'")
    conn.execute("UPDATE items SET payload = 'writer' WHERE id = ?", (first,))
    runs = int(conn.execute("SELECT count(*) FROM items WHERE client = 31").fetchone()[0])
    conn.execute(INSERT, (31, runs))
    fd = _os.open(entered, _os.O_WRONLY)
    _os.write(fd, b"!")
    _os.close(fd)
    fd = _os.open(go, _os.O_RDONLY)
    _os.read(fd, 1)
    _os.close(fd)
    conn.execute("UPDATE items SET payload = 'writer' WHERE id = ?", (second,))
    return "done"


def _await_lock_wait(url: str, pid: int) -> None:
    """Return once the backend ``pid`` waits on a lock (10 s at most)."""
    deadline = time.monotonic() + 10
    with psycopg.connect(url, autocommit=True) as admin:
        while time.monotonic() < deadline:
            row = admin.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            if row is not None and row[0] == "Lock":
                return
            time.sleep(0.005)  # sleep-ok: polling the server's view, bounded by the deadline
    raise AssertionError("the outside session never waited on the lock")


@pytest.mark.timeout(90)
def test_a_real_deadlock_is_rolled_back_and_replayed(
    pg_writer: mpwriter.Writer, pg_fresh: str, tmp_path: Any, gate: Gate
) -> None:
    import os

    ids = [pg_writer.execute(INSERT + " RETURNING id", (30, seq)).rows[0][0] for seq in (1, 2)]
    entered, go = str(tmp_path / "entered"), str(tmp_path / "go")
    os.mkfifo(entered)
    os.mkfifo(go)
    entered_fd = os.open(entered, os.O_RDWR)
    go_fd = os.open(go, os.O_RDWR)
    outside = psycopg.connect(pg_fresh)
    before = pg_writer.stats()
    try:
        outside.execute("SET deadlock_timeout = '10s'")
        # A failing request in the same batch: its error is counted once,
        # though the batch runs again after the deadlock.
        gate.hold(pg_writer)
        duplicate = pg_writer.submit(INSERT, (30, 1))
        done = pg_writer.submit_call(_lock_then, ids[0], ids[1], entered, go)
        gate.release()
        assert gate.future.result(timeout=30) == "released"
        os.read(entered_fd, 1)  # the writer holds row 1
        outside.execute("UPDATE items SET payload = 'outside' WHERE id = %s", (ids[1],))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # The outside session waits for row 1, held by the writer...
            waiting = pool.submit(
                outside.execute, "UPDATE items SET payload = 'outside' WHERE id = %s", (ids[0],)
            )
            _await_lock_wait(pg_fresh, outside.info.backend_pid)
            # ...and the writer now waits for row 2, held outside: a cycle.
            # The server aborts the writer's transaction (40P01); the writer
            # rolls the batch back and replays it, which waits for row 1
            # until the outside session commits.
            os.write(go_fd, b"!!")  # one for each run of the call
            waiting.result(timeout=30)
        outside.commit()
        assert done.result(timeout=60) == "done"
    finally:
        outside.close()
        os.close(entered_fd)
        os.close(go_fd)
    with pytest.raises(mpwriter.IntegrityError):
        duplicate.result(timeout=10)
    after = pg_writer.stats()
    assert after["retries"] >= before["retries"] + 1
    assert after["errors"] == before["errors"] + 1
    with mpwriter.reader(pg_fresh) as conn:
        # The first run's insert was rolled back: one row, written by the replay.
        assert conn.execute("SELECT seq FROM items WHERE client = 31").fetchall() == [(0,)]
        payloads = conn.execute("SELECT payload FROM items WHERE client = 30").fetchall()
    assert payloads == [("writer",), ("writer",)]


# -- item 8: start() failures --------------------------------------------------------


def test_start_on_a_port_nothing_listens_on_is_server_unavailable() -> None:
    with socket.socket() as probe:  # a free port, closed again: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(mpwriter.ServerUnavailable, match="could not be reached") as caught:
        mpwriter.start(f"postgresql://postgres@127.0.0.1:{port}/postgres", context="fork")
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    assert "Connection refused" in str(caught.value.__cause__)


def _as_user(url: str, user: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def test_start_on_a_full_server_is_server_unavailable(pg_url: str) -> None:
    # Roles are the whole server's: a name of its own keeps another run of the
    # suite on the same server from dropping it meanwhile.
    role = f"mpwriter_test_full_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
        try:
            url = _as_user(pg_url, role)
            with pytest.raises(mpwriter.ServerUnavailable, match="too many") as caught:
                mpwriter.start(url, context="fork")
        finally:
            admin.execute(f"DROP ROLE {role}")
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)


def test_a_failing_init_is_an_mpwriter_error_of_its_own_class(pg_fresh: str) -> None:
    with pytest.raises(mpwriter.ProgrammingError) as caught:
        mpwriter.start(pg_fresh, init="SELECT no_such_column FROM items", context="fork")
    assert isinstance(caught.value, psycopg.errors.UndefinedColumn)


WITHOUT_PSYCOPG = """
import sys
sys.modules["psycopg"] = None  # as if it were not installed
import mpwriter
try:
    mpwriter.start(sys.argv[1], context="fork")
except mpwriter.MissingDependency as exc:
    assert isinstance(exc, ImportError) and isinstance(exc.__cause__, ImportError), exc
    print(exc)
"""


def test_start_without_psycopg_names_the_extra_to_install() -> None:
    url = "postgresql://postgres@127.0.0.1:5432/postgres"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PSYCOPG, url],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'mpwriter[postgres]'" in done.stdout


def test_start_as_an_unknown_role_is_server_unavailable(pg_url: str) -> None:
    url = _as_user(pg_url, "mpwriter_test_no_such_role")
    with pytest.raises(mpwriter.ServerUnavailable, match="does not exist") as caught:
        mpwriter.start(url, context="fork")
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
