"""The writer's SQLite connection: how it is opened, and the texts it runs itself.

Shared by the engine (`sqlite.py`), its statement guard (`sqlite_guard.py`)
and interactive sessions (`session.py`); imports nothing of theirs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from operator import itemgetter
from typing import Any

SQLITE_BUSY = 5

# The writer's own statements. sqlite3 caches prepared statements by their
# text, and the authorizer runs only when a statement is prepared: a caller's
# "COMMIT" must never hit the cached, unvetted "COMMIT" of the writer, so the
# writer's texts carry a marker no caller sends by accident.
BEGIN = "BEGIN IMMEDIATE /* mpwriter */"
SAVEPOINT = "SAVEPOINT mpwriter_request /* mpwriter */"
RELEASE = "RELEASE mpwriter_request /* mpwriter */"
ROLLBACK_TO = "ROLLBACK TO mpwriter_request /* mpwriter */"
COMMIT = "COMMIT /* mpwriter */"
ROLLBACK = "ROLLBACK /* mpwriter */"
# Appended to a statement run alone, for the same reason: its unvetted cached
# form must not be found by the same text sent later inside a batch.
SOLO_SUFFIX = "\n/* mpwriter solo */"


class WriterConnection(sqlite3.Connection):
    """The writer's connection: it notes when anyone replaces one of its callbacks.

    Installing an authorizer makes SQLite expire every prepared statement, so
    the writer cannot put its own back after every call() just in case: each
    statement would be prepared (and vetted) again after every call. A call()
    function that replaces the authorizer, the progress handler or the trace
    callback -- through ``conn`` or a cursor's ``.connection``, the same
    object -- is noted here, and only then does the writer restore its own
    and re-check the pinned settings.
    """

    callbacks_changed = False

    def set_authorizer(self, *args: Any, **kwargs: Any) -> None:
        self.callbacks_changed = True
        super().set_authorizer(*args, **kwargs)

    def set_progress_handler(self, *args: Any, **kwargs: Any) -> None:
        self.callbacks_changed = True
        super().set_progress_handler(*args, **kwargs)

    def set_trace_callback(self, *args: Any, **kwargs: Any) -> None:
        self.callbacks_changed = True
        super().set_trace_callback(*args, **kwargs)


def open_database(
    path: str, synchronous: str, init: str | Callable[[Any], object] | None
) -> WriterConnection:
    """Open the write connection: WAL, the chosen durability, foreign keys on."""
    # check_same_thread: a call() function that hands ``conn`` to a thread of
    # its own cannot use it outside its savepoint, nor after it returned.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=True, factory=WriterConnection
    )
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"could not switch {path!r} to WAL (got {mode!r})")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    # Lock waits are retried by the engine with backoff and a deadline per
    # request; SQLite's own busy handler would sleep past those deadlines.
    conn.execute("PRAGMA busy_timeout=0")
    if isinstance(init, str):
        conn.executescript(init)
    elif init is not None:
        init(conn)
    if conn.in_transaction:
        conn.execute("COMMIT")
    return conn


def is_busy(exc: BaseException) -> bool:
    """True for SQLITE_BUSY and its extended codes ("database is locked")."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return bool(code & 0xFF == SQLITE_BUSY)
    return isinstance(exc, sqlite3.OperationalError) and "database is locked" in str(exc)


def split_script(script: str) -> list[str]:
    """Cut a script into statements, using SQLite's own tokenizer to find ends.

    A ';' inside a string, a comment or a trigger body does not end a
    statement; `sqlite3.complete_statement` knows the difference.
    """
    statements: list[str] = []
    start = 0
    position = script.find(";")
    while position >= 0:
        candidate = script[start : position + 1]
        if sqlite3.complete_statement(candidate):
            statements.append(candidate)
            start = position + 1
        position = script.find(";", position + 1)
    tail = script[start:]
    if tail.strip():
        statements.append(tail)
    return statements


def execute(cursor: sqlite3.Cursor, sql: str, params: Any) -> tuple[Any, ...]:
    """``Result``'s fields: (rowcount, lastrowid, rows), and the column names
    of a statement that has a result set (rows or not, as sqlite3's
    ``description``); a write without one keeps the compact 3-tuple."""
    cursor.execute(sql, params)
    description = cursor.description
    if description is None:
        return (cursor.rowcount, cursor.lastrowid, [])
    # RETURNING rows must be fetched before rowcount is final.
    rows = cursor.fetchall()
    return (cursor.rowcount, cursor.lastrowid, rows, tuple(map(_name, description)))


_name = itemgetter(0)  # a column's name from its `description` entry, in C
