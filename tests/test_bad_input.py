"""Bad input: each case ends in a clear error for that caller, and the writer serves on."""

from __future__ import annotations

import importlib
import os
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import mpwriter
from conftest import SCHEMA, count_rows, reap_pid

CHECKED_SCHEMA = """
CREATE TABLE parent(id INTEGER PRIMARY KEY);
CREATE TABLE checked(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    age INTEGER CHECK (age >= 0),
    parent INTEGER REFERENCES parent(id)
);
"""


@pytest.mark.parametrize(
    ("sql", "params", "error", "match"),
    [
        ("INSERT INTO checked(name) VALUES (NULL)", (), sqlite3.IntegrityError, "NOT NULL"),
        ("INSERT INTO checked(name, age) VALUES ('a', -1)", (), sqlite3.IntegrityError, "CHECK"),
        ("INSERT INTO checked(name) VALUES ('dup')", (), sqlite3.IntegrityError, "UNIQUE"),
        (
            "INSERT INTO checked(name, parent) VALUES ('orphan', 7)",
            (),
            sqlite3.IntegrityError,
            "FOREIGN KEY",
        ),
        (
            "INSERT INTO checked(name) VALUES (?, ?)",
            ("a", "b"),
            sqlite3.OperationalError,
            "2 values for 1 columns",
        ),
        (
            "INSERT INTO checked(name) VALUES (?)",
            ("a", "b"),
            sqlite3.ProgrammingError,
            "number of bindings",
        ),
        (  # InterfaceError up to Python 3.10, ProgrammingError since
            "INSERT INTO checked(name) VALUES (?)",
            ([1],),
            (sqlite3.ProgrammingError, sqlite3.InterfaceError),
            "unsupported|not supported",
        ),
        ("INSERT INTO", (), sqlite3.OperationalError, "syntax error|incomplete input"),
        ("ATTACH DATABASE ':memory:' AS other", (), mpwriter.StatementRefused, "ATTACH"),
    ],
)
def test_bad_statements_fail_alone(
    writer: mpwriter.Writer,
    sql: str,
    params: tuple[object, ...],
    error: type | tuple[type, ...],
    match: str,
) -> None:
    writer.executescript(CHECKED_SCHEMA + "INSERT INTO checked(name) VALUES ('dup');")
    with pytest.raises(error, match=match):
        writer.execute(sql, params)
    assert writer.execute("INSERT INTO checked(name) VALUES ('fine')").rowcount == 1


def test_a_50_mb_blob_round_trips(writer: mpwriter.Writer, db_path: Path) -> None:
    blob = os.urandom(50 * 1024 * 1024)
    writer.execute("CREATE TABLE blobs(data BLOB)")
    writer.execute("INSERT INTO blobs VALUES (?)", (blob,), timeout=60)
    with mpwriter.reader(db_path) as conn:
        assert conn.execute("SELECT data FROM blobs").fetchone()[0] == blob


def test_a_large_reply_does_not_stall_the_writer(writer: mpwriter.Writer) -> None:
    writer.execute("CREATE TABLE big(data TEXT)")
    rows = writer.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)"
        " INSERT INTO big SELECT hex(randomblob(500)) FROM n RETURNING data"
    ).rows
    assert len(rows) == 5000  # about 5 MB of reply, far more than a pipe holds
    assert writer.execute("INSERT INTO big VALUES ('next')").rowcount == 1


@pytest.mark.timeout(120)  # a million rows cross the pipe and are inserted
def test_executemany_of_a_million_rows(writer: mpwriter.Writer, db_path: Path) -> None:
    result = writer.executemany(
        "INSERT INTO items(client, seq) VALUES (1, ?)", ((n,) for n in range(1_000_000)), timeout=90
    )
    assert result.rowcount == 1_000_000
    assert count_rows(db_path) == 1_000_000


# Run with ``python -c``: under spawn the writer cannot re-import such a
# __main__, so a function defined there cannot be found by the writer.
MAIN_FUNCTION_SCRIPT = textwrap.dedent(
    """
    import sys, mpwriter

    def defined_in_main(conn):
        return 1

    with mpwriter.start(sys.argv[1], context="spawn") as writer:
        try:
            writer.call(defined_in_main)
        except Exception as exc:
            print(type(exc).__name__, exc)
        print(writer.execute("SELECT 1").rows)
    """
)


def test_a_call_the_writer_cannot_import_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", MAIN_FUNCTION_SCRIPT, str(tmp_path / "app.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    first, second = result.stdout.splitlines()
    assert first.startswith("AttributeError")
    assert "defined_in_main" in first
    assert second == "[(1,)]"


def _start_in(directory: str, report: int) -> None:
    """In a forked child: try to start a writer in ``directory``; report the outcome."""
    if os.geteuid() == 0:
        # Root writes into any directory: drop to "nobody" so that the mode
        # bits apply, as they do for every other user. Modules start() loads
        # lazily are loaded first: nobody may not read root's interpreter.
        for module in ("multiprocessing.sharedctypes", "multiprocessing.popen_fork"):
            importlib.import_module(module)
        os.setgid(65534)
        os.setuid(65534)
    try:
        mpwriter.start(os.path.join(directory, "app.db"), context="fork").close()
        outcome = "started"
    except (sqlite3.OperationalError, PermissionError) as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    except BaseException as exc:
        outcome = f"unexpected {type(exc).__name__}: {exc}"
    os.write(report, outcome.encode())


def test_a_directory_that_is_not_writable_is_a_clear_error() -> None:
    # Not under tmp_path: pytest makes that 0700, which "nobody" cannot enter.
    locked = tempfile.mkdtemp(prefix="mpwriter-locked-")
    os.chmod(locked, 0o555)  # nobody may write here (root excepted: see _start_in)
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.close(read_end)
                _start_in(locked, write_end)
            finally:
                os._exit(0)
        os.close(write_end)
        write_end = -1
        assert select.select([read_end], [], [], 30)[0], "the child did not report"
        outcome = os.read(read_end, 4096).decode()
        reap_pid(pid)
        assert outcome.startswith(("OperationalError", "PermissionError")), outcome
        assert os.listdir(locked) == []
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        os.chmod(locked, 0o700)
        shutil.rmtree(locked)


ATEXIT_SCRIPT = textwrap.dedent(
    """
    import sys, mpwriter
    writer = mpwriter.start(sys.argv[1], init="CREATE TABLE t(x)")
    writer.executemany("INSERT INTO t VALUES (?)", [(n,) for n in range(1000)])
    print(writer.stats()["pid"])
    # no close(): the interpreter's exit must close the writer
    """
)


def test_interpreter_exit_closes_the_writer(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    result = subprocess.run(
        [sys.executable, "-c", ATEXIT_SCRIPT, str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    writer_pid = int(result.stdout)
    with pytest.raises(ProcessLookupError):
        os.kill(writer_pid, 0)  # gone, not orphaned
    wal = tmp_path / "app.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed on the way out
    with mpwriter.start(db, context="fork") as again:  # and the lock is free
        assert again.execute("SELECT count(*) FROM t").rows == [(1000,)]


def test_start_refuses_in_memory_databases(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file"):
        mpwriter.start(":memory:")
    with pytest.raises(ValueError, match="synchronous"):
        mpwriter.start(tmp_path / "a.db", synchronous="SOMETIMES")


def test_sql_passed_as_the_wrong_type_is_the_sqlite3_error(writer: mpwriter.Writer) -> None:
    with pytest.raises((TypeError, sqlite3.ProgrammingError)):
        writer.execute(b"INSERT INTO items DEFAULT VALUES")  # type: ignore[arg-type]
    assert writer.execute("INSERT INTO items DEFAULT VALUES").rowcount == 1


def test_schema_init_runs_before_serving(db_path: Path) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork") as writer:
        assert writer.execute("SELECT count(*) FROM items").rows == [(0,)]
