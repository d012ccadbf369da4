"""Schema migrations: an ordered list applied once each, at start, in the writer.

``start(path, migrations=[...])`` hands the writer a list of SQL scripts or
functions of the connection. When the writer opens its database (at start,
and again after each restart), it applies those not applied yet, in order,
each in its own transaction together with the row that records it, so that a
migration is either applied and recorded or neither. One that fails is rolled
back whole -- nothing of it stays -- and stops the start with
`MigrationFailed`; the migrations before it stay applied and recorded.

They are tracked in a table, ``mpwriter_migrations(version, description,
applied_at)``, on both engines, rather than SQLite's ``PRAGMA user_version``:
the same design serves PostgreSQL (which has no such header field), an app
or a tool of its own (its own migration scheme) may already use
``user_version``, and a table shows people what was applied and when.

A database that has recorded more migrations than the list holds (an older
version of the app started against a newer schema) is refused: the code
would run against a schema it does not know.

PostgreSQL may have several writers (one per machine) starting at once: each
migration's transaction takes a transaction-level advisory lock and looks
again at what is recorded, so that each migration is applied once.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import MigrationFailed

log = logging.getLogger("mpwriter")

Migration = str | Callable[[Any], object]

TABLE = "mpwriter_migrations"
# How long a SQLite migration waits for a write lock held outside mpwriter (the
# sqlite3 shell, a backup), in milliseconds; the writer's own busy_timeout is 0.
_LOCK_WAIT_MS = 10_000
# pg_advisory_xact_lock's key: any constant of our own ("mpwm" in ASCII).
_ADVISORY_KEY = 0x6D70_776D


def describe(migration: Migration) -> str:
    """A short text that names ``migration`` for people (its SQL's first line, or the function)."""
    if isinstance(migration, str):
        lines = [line.strip() for line in migration.strip().splitlines() if line.strip()]
        head = lines[0] if lines else "(empty)"
        return head if len(head) <= 80 and len(lines) <= 1 else head[:77].rstrip() + " ..."
    module = getattr(migration, "__module__", None) or "?"
    return f"{module}.{getattr(migration, '__qualname__', repr(migration))}"


def _check_count(applied: int, migrations: Sequence[Migration]) -> None:
    if applied > len(migrations):
        raise MigrationFailed(
            f"the database has {applied} migrations applied (table {TABLE}) but this "
            f"start() lists only {len(migrations)}: an older version of the app? "
            "Start it with the full list (migrations are only ever appended)."
        )


def _failed(number: int, migrations: Sequence[Migration], exc: BaseException) -> MigrationFailed:
    # The exception crosses a process boundary as a pickle, which drops
    # __cause__: its class and text go into the message.
    earlier = "no migration before it" if number == 1 else f"migrations 1-{number - 1}"
    return MigrationFailed(
        f"migration {number} of {len(migrations)} ({describe(migrations[number - 1])}) "
        f"failed: {type(exc).__module__}.{type(exc).__qualname__}: {exc}. Nothing of it "
        f"was applied; {earlier} stay applied. Fix it and start again."
    )


def apply_sqlite(
    conn: sqlite3.Connection,
    migrations: Sequence[Migration],
    split: Callable[[str], list[str]],
) -> None:
    """Apply the migrations not applied yet to the writer's SQLite connection.

    ``conn`` is in autocommit mode (``isolation_level=None``); ``split`` cuts
    an SQL script into statements (``executescript`` would COMMIT first, and
    the migration and its record must share one transaction). Raises
    `MigrationFailed`.
    """
    if not migrations:
        return
    (foreign_keys,) = conn.execute("PRAGMA foreign_keys").fetchone()
    conn.execute(f"PRAGMA busy_timeout={_LOCK_WAIT_MS}")
    # SQLite's recipe for the table changes ALTER TABLE cannot make
    # (https://www.sqlite.org/lang_altertable.html#otheralter): foreign keys
    # off while a migration rebuilds a table (a DROP TABLE would otherwise
    # delete the children's parents; the pragma is a no-op inside a
    # transaction, so it is set here), then PRAGMA foreign_key_check before
    # COMMIT, so that a migration cannot leave a row that breaks one.
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE}(version INTEGER PRIMARY KEY,"
            " description TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        (applied,) = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
        _check_count(applied, migrations)
        for number in range(applied + 1, len(migrations) + 1):
            _apply_one_sqlite(conn, number, migrations, split)
    finally:
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")


def _apply_one_sqlite(
    conn: sqlite3.Connection,
    number: int,
    migrations: Sequence[Migration],
    split: Callable[[str], list[str]],
) -> None:
    """Apply migration ``number`` (from 1) and record it, in one transaction.

    Rolled back whole, and `MigrationFailed` raised, if it fails, leaves a
    row that breaks a foreign key, or ends the transaction itself.
    """
    migration = migrations[number - 1]
    conn.execute("BEGIN IMMEDIATE")
    try:
        if isinstance(migration, str):
            for statement in split(migration):
                conn.execute(statement)
        else:
            migration(conn)
        broken = conn.execute("PRAGMA foreign_key_check").fetchall()
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise _failed(number, migrations, exc) from exc
    if broken and conn.in_transaction:
        conn.execute("ROLLBACK")
        table, rowid, parent, _ = broken[0]
        raise _failed(
            number,
            migrations,
            sqlite3.IntegrityError(
                f"it left {len(broken)} row(s) that break a foreign key"
                f" (PRAGMA foreign_key_check; the first: {table} rowid {rowid}"
                f" -> {parent})"
            ),
        )
    if not conn.in_transaction:
        raise MigrationFailed(
            f"migration {number} ({describe(migration)}) ended its own transaction "
            "(a COMMIT or ROLLBACK, or executescript(), which commits first): what "
            "it did before that may be applied, and it is not recorded. A migration "
            "leaves its transaction to the writer."
        )
    conn.execute(
        f"INSERT INTO {TABLE}(version, description) VALUES (?, ?)",
        (number, describe(migration)),
    )
    conn.execute("COMMIT")
    log.info("mpwriter: applied migration %d: %s", number, describe(migration))


def apply_postgres(
    conn: Any, migrations: Sequence[Migration], split: Callable[[str], list[str]]
) -> None:
    """Apply the migrations not applied yet over the writer's psycopg connection.

    ``conn`` is in autocommit mode; ``split`` cuts a script into statements
    (as ``init`` is cut). Each migration runs in a transaction that
    holds an advisory lock, so that writers starting at once on several
    machines apply each migration once. Raises `MigrationFailed`.
    """
    if not migrations:
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_KEY,))
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE}(version integer PRIMARY KEY,"
            " description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
    for number in range(1, len(migrations) + 1):
        migration = migrations[number - 1]
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_KEY,))
                (applied,) = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
                _check_count(applied, migrations)
                if number <= applied:
                    continue  # applied before, or by another writer meanwhile
                if isinstance(migration, str):
                    for statement in split(migration):
                        conn.execute(statement)
                else:
                    migration(conn)
                conn.execute(
                    f"INSERT INTO {TABLE}(version, description) VALUES (%s, %s)",
                    (number, describe(migration)),
                )
        except MigrationFailed:
            raise
        except BaseException as exc:
            raise _failed(number, migrations, exc) from exc
        log.info("mpwriter: applied migration %d: %s", number, describe(migration))
