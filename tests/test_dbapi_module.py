"""mpwriter.dbapi: PEP 249's module, sqlite3's transaction semantics, where statements run."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mpwriter
from conftest import SCHEMA, Gate, count_rows
from mpwriter import dbapi

INSERT = "INSERT INTO items(client, seq, payload) VALUES (?, ?, ?)"


@pytest.fixture
def conn(writer: mpwriter.Writer) -> Iterator[dbapi.Connection]:
    connection = dbapi.connect(writer.path, writer=writer)
    try:
        yield connection
    finally:
        connection.close()


def requests_served(writer: mpwriter.Writer) -> int:
    return writer.stats()["requests"]


# -- the module ------------------------------------------------------------------


def test_module_globals_are_pep_249s() -> None:
    assert dbapi.apilevel == "2.0"
    assert dbapi.threadsafety == 1
    assert dbapi.paramstyle == "qmark"
    assert dbapi.sqlite_version_info == sqlite3.sqlite_version_info
    assert dbapi.sqlite_version == sqlite3.sqlite_version


def test_the_exception_tree_is_pep_249s_rooted_at_mpwriters() -> None:
    assert dbapi.Error is mpwriter.Error
    assert dbapi.DatabaseError is mpwriter.DatabaseError
    assert dbapi.IntegrityError is mpwriter.IntegrityError
    assert dbapi.OperationalError is mpwriter.OperationalError
    assert dbapi.ProgrammingError is mpwriter.ProgrammingError
    assert issubclass(dbapi.InterfaceError, dbapi.Error)
    for name in (
        "DataError",
        "OperationalError",
        "IntegrityError",
        "InternalError",
        "ProgrammingError",
        "NotSupportedError",
    ):
        assert issubclass(getattr(dbapi, name), dbapi.DatabaseError), name
        assert getattr(dbapi.Connection, name) is getattr(dbapi, name)
    assert issubclass(dbapi.Warning, Exception)
    assert not issubclass(dbapi.Warning, dbapi.Error)
    for cls in (dbapi.InterfaceError, dbapi.DataError, dbapi.NotSupportedError, dbapi.Warning):
        copy = pickle.loads(pickle.dumps(cls("why")))
        assert type(copy) is cls
        assert str(copy) == "why"


def test_type_objects_and_constructors() -> None:
    assert dbapi.STRING == "TEXT"
    assert dbapi.NUMBER == "integer"
    assert dbapi.BINARY == "BLOB"
    assert dbapi.STRING != "BLOB"
    assert dbapi.Date(2024, 2, 29).isoformat() == "2024-02-29"
    assert dbapi.Timestamp(2024, 2, 29, 12, 0).hour == 12
    assert dbapi.DateFromTicks(0).year in (1969, 1970)
    assert bytes(dbapi.Binary(b"ab")) == b"ab"


def test_connect_without_a_handle_or_a_writer_says_so(tmp_path: Path) -> None:
    with pytest.raises(mpwriter.WriterUnavailable, match="no writer serves"):
        dbapi.connect(tmp_path / "none-here.db")  # mpwriter.connect finds none


def test_a_writer_for_another_file_is_refused(writer: mpwriter.Writer, tmp_path: Path) -> None:
    with pytest.raises(dbapi.InterfaceError, match="serves"):
        dbapi.connect(tmp_path / "elsewhere.db", writer=writer)


def test_connect_uses_the_attached_writer(writer: mpwriter.Writer) -> None:
    mpwriter.attach(writer)
    conn = dbapi.connect(writer.path, isolation_level=None)
    try:
        conn.execute(INSERT, (1, 1, "attached"))
    finally:
        conn.close()
    assert count_rows(Path(writer.path)) == 1


def count_dials(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths `mpwriter.connect` is called with from now on, in order."""
    dialed: list[str] = []
    connect = mpwriter.connect

    def counting_connect(path: str) -> mpwriter.Writer:
        dialed.append(path)
        return connect(path)

    monkeypatch.setattr(mpwriter, "connect", counting_connect)
    return dialed


def test_connect_falls_back_to_mpwriter_connect_once_per_file(
    writer: mpwriter.Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dialed = count_dials(monkeypatch)
    # This process's attached writer serves another file: the endpoint is asked.
    mpwriter.attach(mpwriter.start(Path(writer.path).with_name("other.db"), context="fork"))
    try:
        first = dbapi.connect(writer.path, isolation_level=None)
        second = dbapi.connect(writer.path, isolation_level=None)
        first.execute(INSERT, (1, 1, "connected"))
        assert second.execute("SELECT payload FROM items").fetchall() == [("connected",)]
        first.close()
        second.close()
    finally:
        mpwriter.get_writer().close(timeout=10.0)
    assert dialed == [writer.path]
    assert count_rows(Path(writer.path)) == 1


def test_dbapi_uses_the_handle_django_got_for_the_file(
    writer: mpwriter.Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One handle per file for the process, whichever integration asked first."""
    import mpwriter.django

    django_handle = mpwriter.django.writer_for(writer.path)  # connects: a writer serves
    dialed = count_dials(monkeypatch)
    try:
        conn = dbapi.connect(writer.path, isolation_level=None)
        conn.execute(INSERT, (1, 1, "shared"))
        conn.close()
        mpwriter.django.close_writer(writer.path)
        assert django_handle.closed
        # Once closed, it is made again (by dbapi's connect, this time).
        conn = dbapi.connect(writer.path, isolation_level=None)
        conn.execute(INSERT, (1, 2, "again"))
        conn.close()
    finally:
        mpwriter.django.close_writer(writer.path)
    assert dialed == [writer.path]
    assert count_rows(Path(writer.path)) == 2


# A thread is inside dbapi.connect (holding the lock of the process's handles,
# connecting) when the process forks: the child, which has no such thread,
# still gets a handle. faulthandler ends a stuck child, saying where it was.
_FORK_WHILE_CONNECTING = """
import faulthandler, os, sys, threading
import mpwriter
from mpwriter import dbapi

served, elsewhere = sys.argv[1], sys.argv[2]
connect = mpwriter.connect
inside, leave = threading.Event(), threading.Event()

def held_connect(path):
    if path == elsewhere:
        inside.set()
        assert leave.wait(60)
        raise mpwriter.WriterUnavailable("no writer serves it (this test's)")
    return connect(path)

def connect_elsewhere():
    try:
        dbapi.connect(elsewhere)
    except mpwriter.WriterUnavailable:
        pass

mpwriter.connect = held_connect
thread = threading.Thread(target=connect_elsewhere)
thread.start()
assert inside.wait(60)
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(20, exit=True)
    conn = dbapi.connect(served, isolation_level=None)
    conn.execute("INSERT INTO items(client, seq, payload) VALUES (1, 1, 'child')")
    conn.close()
    os._exit(0)
leave.set()
thread.join(60)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
print("child connected", flush=True)
"""


def test_a_child_forked_while_a_thread_connects_still_gets_a_handle(
    writer: mpwriter.Writer, tmp_path: Path
) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    script = [sys.executable, "-c", _FORK_WHILE_CONNECTING]
    done = subprocess.run(
        [*script, writer.path, str(tmp_path / "elsewhere.db")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,  # the code is asserted with what the process printed
    )
    assert (done.returncode, done.stdout) == (0, "child connected\n"), done.stderr
    assert count_rows(Path(writer.path)) == 1


def test_a_postgresql_url_is_refused_with_where_to_go() -> None:
    with pytest.raises(dbapi.NotSupportedError, match="psycopg"):
        dbapi.connect("postgresql://postgres@127.0.0.1/postgres")


@pytest.mark.parametrize(
    ("database", "options"),
    [(":memory:", {}), ("file:app.db?mode=rw", {"uri": True}), ("app.db", {"detect_types": 1})],
)
def test_what_the_writer_cannot_serve_is_refused(
    writer: mpwriter.Writer, database: str, options: dict[str, object]
) -> None:
    with pytest.raises(dbapi.NotSupportedError):
        dbapi.connect(database, writer=writer, **options)


# -- where statements run ----------------------------------------------------------


def test_a_read_outside_a_transaction_runs_locally_even_while_the_writer_is_busy(
    writer: mpwriter.Writer, conn: dbapi.Connection, gate: Gate
) -> None:
    writer.execute(INSERT, (1, 1, "x"))
    gate.hold(writer)
    try:
        assert conn.execute("SELECT payload FROM items").fetchall() == [("x",)]
    finally:
        gate.release()
    assert gate.future.result(timeout=10) == "released"


def test_a_write_outside_a_transaction_is_one_writer_request(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    conn.isolation_level = None
    before = requests_served(writer)
    cur = conn.execute(INSERT, (1, 1, "x"))
    assert (cur.rowcount, cur.lastrowid) == (1, 1)
    assert not conn.in_transaction
    assert requests_served(writer) == before + 1
    assert count_rows(Path(writer.path)) == 1  # committed: other connections see it
    conn.execute("SELECT * FROM items").fetchall()
    assert requests_served(writer) == before + 1  # the read was local


def test_ddl_outside_a_transaction_autocommits_as_sqlite3s_legacy_mode(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    conn.execute("CREATE TABLE extra(a)")
    assert not conn.in_transaction
    with mpwriter.reader(writer.path) as other:
        assert other.execute("SELECT name FROM sqlite_master WHERE name='extra'").fetchone()


def test_a_pragma_that_writes_the_file_goes_to_the_writer(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    conn.execute("PRAGMA user_version = 7")
    assert conn.execute("PRAGMA user_version").fetchone() == (7,)


# -- sqlite3's transaction semantics -------------------------------------------------


def test_dml_opens_a_transaction_that_reads_its_own_writes_and_commits_durably(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    assert conn.isolation_level == "DEFERRED"
    conn.execute(INSERT, (1, 1, "mine"))
    assert conn.in_transaction
    assert conn.execute("SELECT payload FROM items").fetchall() == [("mine",)]
    assert count_rows(Path(writer.path)) == 0  # not yet committed
    conn.commit()
    assert not conn.in_transaction
    assert count_rows(Path(writer.path)) == 1


def test_rollback_discards_the_transaction(writer: mpwriter.Writer, conn: dbapi.Connection) -> None:
    conn.execute(INSERT, (1, 1, "gone"))
    conn.rollback()
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
    assert count_rows(Path(writer.path)) == 0


def test_close_rolls_back_an_open_transaction(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    conn.execute(INSERT, (1, 1, "gone"))
    conn.close()
    assert count_rows(Path(writer.path)) == 0
    with pytest.raises(dbapi.ProgrammingError, match="closed database"):
        conn.execute("SELECT 1")


def test_explicit_begin_and_commit_statements(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    conn.execute("BEGIN")
    assert conn.in_transaction
    with pytest.raises(dbapi.OperationalError, match="within a transaction"):
        conn.execute("BEGIN IMMEDIATE")
    conn.execute(INSERT, (1, 1, "x"))
    conn.execute("COMMIT")
    assert not conn.in_transaction
    assert count_rows(Path(writer.path)) == 1
    with pytest.raises(dbapi.OperationalError, match="no transaction is active"):
        conn.execute("COMMIT")


def test_savepoints_nest_inside_the_transaction(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    conn.execute(INSERT, (1, 1, "kept"))
    conn.execute("SAVEPOINT sp")
    conn.execute(INSERT, (1, 2, "undone"))
    conn.execute("ROLLBACK TO SAVEPOINT sp")
    conn.execute("RELEASE SAVEPOINT sp")
    conn.commit()
    assert conn.execute("SELECT payload FROM items").fetchall() == [("kept",)]


def test_a_savepoint_outside_a_transaction_opens_one(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    conn.execute("SAVEPOINT outer_sp")
    assert conn.in_transaction
    conn.execute(INSERT, (1, 1, "x"))
    conn.execute("RELEASE outer_sp")
    assert count_rows(Path(writer.path)) == 0  # RELEASE ended the savepoint, not the transaction
    conn.commit()
    assert count_rows(Path(writer.path)) == 1


def test_isolation_level_none_is_autocommit(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    conn.isolation_level = None
    conn.execute(INSERT, (1, 1, "x"))
    assert not conn.in_transaction
    assert count_rows(Path(writer.path)) == 1


def test_setting_isolation_level_none_commits_the_open_transaction(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    conn.execute(INSERT, (1, 1, "x"))
    conn.isolation_level = None
    assert not conn.in_transaction
    assert count_rows(Path(writer.path)) == 1


def test_autocommit_false_keeps_a_transaction_open(writer: mpwriter.Writer) -> None:
    conn = dbapi.connect(writer.path, writer=writer, autocommit=False)
    try:
        assert conn.in_transaction
        conn.execute(INSERT, (1, 1, "x"))
        assert count_rows(Path(writer.path)) == 0
        conn.commit()
        assert conn.in_transaction
        assert count_rows(Path(writer.path)) == 1
        conn.execute(INSERT, (1, 2, "y"))
    finally:
        conn.close()
    assert count_rows(Path(writer.path)) == 1  # close rolled the second back


def test_autocommit_true_begins_only_when_told(writer: mpwriter.Writer) -> None:
    conn = dbapi.connect(writer.path, writer=writer, autocommit=True)
    try:
        conn.execute(INSERT, (1, 1, "x"))
        assert not conn.in_transaction
        assert count_rows(Path(writer.path)) == 1
        conn.execute("BEGIN")
        conn.execute(INSERT, (1, 2, "y"))
        conn.commit()  # a no-op with autocommit=True, as in sqlite3
        assert conn.in_transaction
        conn.execute("COMMIT")
        assert count_rows(Path(writer.path)) == 2
    finally:
        conn.close()


def test_the_context_manager_commits_or_rolls_back(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    with conn:
        conn.execute(INSERT, (1, 1, "kept"))

    def fail_inside() -> None:
        with conn:
            conn.execute(INSERT, (1, 2, "undone"))
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail_inside()
    assert conn.execute("SELECT payload FROM items").fetchall() == [("kept",)]


# -- cursors ---------------------------------------------------------------------


def test_cursor_fetching_and_description(writer: mpwriter.Writer, conn: dbapi.Connection) -> None:
    conn.isolation_level = None
    cur = conn.cursor()
    cur.executemany(INSERT, [(1, i, f"p{i}") for i in range(5)])
    assert cur.rowcount == 5
    cur.execute("SELECT seq, payload FROM items ORDER BY seq")
    assert [d[0] for d in cur.description] == ["seq", "payload"]
    assert cur.rowcount == -1
    assert cur.fetchone() == (0, "p0")
    cur.arraysize = 2
    assert cur.fetchmany() == [(1, "p1"), (2, "p2")]
    assert list(cur) == [(3, "p3"), (4, "p4")]
    assert cur.fetchone() is None
    cur.execute("INSERT INTO items(seq) VALUES (:seq) RETURNING id, seq", {"seq": 9})
    assert cur.fetchall() == [(6, 9)]
    assert cur.description[0][0] == "id"
    cur.close()
    with pytest.raises(dbapi.ProgrammingError):
        cur.fetchone()


def test_executemany_refuses_a_query(conn: dbapi.Connection) -> None:
    with pytest.raises(dbapi.ProgrammingError, match="DML"):
        conn.executemany("SELECT ?", [(1,), (2,)])


def test_executescript_commits_a_pending_transaction_first(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    conn.execute(INSERT, (1, 1, "x"))
    conn.executescript("CREATE TABLE s(a); INSERT INTO s VALUES (1);")
    assert not conn.in_transaction
    assert count_rows(Path(writer.path)) == 1
    assert count_rows(Path(writer.path), "s") == 1


# -- errors ----------------------------------------------------------------------


def test_sql_errors_are_sqlite3s_and_the_modules_wherever_they_ran(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    with pytest.raises(sqlite3.OperationalError) as local:
        conn.execute("SELECT * FROM missing")  # the local reader
    assert isinstance(local.value, dbapi.OperationalError)
    conn.isolation_level = None
    conn.execute("INSERT INTO items(id) VALUES (1)")
    with pytest.raises(sqlite3.IntegrityError) as alone:
        conn.execute("INSERT INTO items(id) VALUES (1)")  # one writer request
    assert isinstance(alone.value, dbapi.IntegrityError)
    conn.isolation_level = ""
    conn.execute("INSERT INTO items(id) VALUES (2)")
    with pytest.raises(sqlite3.IntegrityError) as in_session:
        conn.execute("INSERT INTO items(id) VALUES (2)")  # in the transaction
    assert isinstance(in_session.value, dbapi.IntegrityError)
    conn.commit()  # the statement alone failed, as in sqlite3
    assert count_rows(Path(writer.path)) == 2


def test_statement_kinds_asked_once_per_text_stay_right_on_repeats(tmp_path: Path) -> None:
    # The second and later runs of each text take the kind SQLite gave the first.
    handle = mpwriter.start(tmp_path / "k.db", init=SCHEMA, context="fork", timeout=10.0)
    try:
        conn = dbapi.connect(handle.path, writer=handle, isolation_level=None)
        for seq in range(3):
            conn.execute(INSERT, (1, seq, "x"))
            assert conn.execute("SELECT count(*) FROM items").fetchone()[0] >= 1
        assert count_rows(Path(handle.path)) == 3
        conn.close()
    finally:
        handle.close(timeout=10.0)


def test_a_cached_read_recompiled_after_a_schema_change_still_runs_locally(
    writer: mpwriter.Writer, conn: dbapi.Connection
) -> None:
    count = "SELECT count(*) FROM items"
    assert conn.execute(count).fetchone() == (0,)
    conn.execute(INSERT, (1, 1, "x"))  # refused locally, noted as a write
    conn.commit()
    writer.execute("CREATE TABLE later(a)")  # SQLite compiles the read again
    assert conn.execute(count).fetchone() == (1,)


def test_an_expired_transaction_raises_operational_error_and_the_connection_goes_on(
    writer: mpwriter.Writer,
) -> None:
    conn = dbapi.connect(writer.path, writer=writer, idle_limit=0.3)
    try:
        conn.execute(INSERT, (1, 1, "rolled back"))
        # Held behind the open transaction, served once the writer has rolled it back.
        writer.execute(INSERT, (2, 1, "other"), timeout=10.0)
        with pytest.raises(dbapi.OperationalError) as expired:
            conn.execute(INSERT, (1, 2, "late"))
        assert isinstance(expired.value, mpwriter.SessionExpired)
        assert not conn.in_transaction  # the writer rolled it back
        conn.rollback()
        conn.execute(INSERT, (1, 3, "after"))
        conn.commit()
    finally:
        conn.close()
    with mpwriter.reader(writer.path) as other:
        rows = other.execute("SELECT payload FROM items ORDER BY id").fetchall()
    assert rows == [("other",), ("after",)]


def test_a_writer_killed_mid_transaction_ends_it_and_the_connection_goes_on(
    writer: mpwriter.Writer,
) -> None:
    pid = writer.stats()["pid"]  # asked first: an open transaction holds every request
    conn = dbapi.connect(writer.path, writer=writer)
    try:
        conn.execute(INSERT, (1, 1, "lost"))
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(mpwriter.WriterCrashed, match="rolled back"):
            conn.execute(INSERT, (1, 2, "late"))
        assert not conn.in_transaction
        conn.execute(INSERT, (1, 3, "after"))  # a new transaction, in the restarted writer
        conn.commit()
    finally:
        conn.close()
    assert writer.execute("SELECT payload FROM items", timeout=30.0).rows == [("after",)]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3.Connection.getlimit is 3.11's")
def test_getlimit_answers_as_sqlite3_does(conn: dbapi.Connection) -> None:
    # Django 6 sizes bulk inserts by the variables a statement may hold.
    category = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER
    with contextlib.closing(sqlite3.connect(":memory:")) as reference:
        assert conn.getlimit(category) == reference.getlimit(category)
