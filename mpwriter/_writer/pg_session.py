"""The writer's one PostgreSQL session: opened, put back after every COMMIT, rolled back.

The session is every caller's. `connect` opens it and runs ``init``; what
``init`` left (the session's synchronous_commit, its session values) is read
once (`session_baseline`), and `commit` sends it with every COMMIT, so that
no batch inherits what another changed in ways the lexer cannot see.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql as psql
from psycopg.pq import TransactionStatus

from .._errors import ServerUnavailable, carry_cause
from . import forks
from .pg_errors import classify, sendable
from .pg_sql import split_statements

log = logging.getLogger("mpwriter")

Reset = list[psql.SQL | psql.Composed]


def connect(
    dsn: str, init: str | Callable[[Any], object] | None, connect_timeout: int
) -> tuple[psycopg.Connection[Any], psql.Composed, Reset]:
    """Open the connection and run ``init``; return it with its `session_baseline`.

    Raises `ServerUnavailable` (its cause psycopg's error) if the server
    cannot be reached or refuses the connection (down, full, no such
    role...), and ``init``'s own error if that fails.
    """
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=True,  # the engine sends BEGIN and COMMIT itself
            connect_timeout=max(2, connect_timeout),
            application_name="mpwriter",
        )
    except psycopg.Error as exc:
        failure = ServerUnavailable(
            f"the PostgreSQL server could not be reached or refused the connection: {exc}"
        )
        raise carry_cause(failure, sendable(exc)) from exc
    # A child forked by a call() function lets go of the server socket: one
    # that lived on would keep the writer's session (its transaction, its
    # locks) open after the writer died, and could write on it (`forks`).
    forks.forbid_in_child(conn.fileno())
    try:
        if init is not None:
            with conn.transaction():
                if isinstance(init, str):
                    for statement in split_statements(init):
                        conn.execute(statement)
                else:
                    init(conn)
        durable, reset = session_baseline(conn)
    except BaseException:
        conn.close()
        raise
    return conn, durable, reset


def session_baseline(conn: psycopg.Connection[Any]) -> tuple[psql.Composed, Reset]:
    """What `commit` sends around COMMIT, read once ``init`` has run.

    The SET LOCAL that gives every COMMIT the session's synchronous_commit,
    and the statements that put every session value back as the connection
    and ``init`` left it: RESET SESSION AUTHORIZATION (which resets the role
    too; RESET ALL leaves both), RESET ALL, then ``init``'s own session values.
    """
    row = conn.execute("SHOW synchronous_commit").fetchone()
    assert row is not None
    durable = psql.SQL("SET LOCAL synchronous_commit = {}").format(psql.Literal(row[0]))
    reset: Reset = [
        psql.SQL("RESET SESSION AUTHORIZATION"),
        psql.SQL("RESET ALL"),
    ]
    kept = conn.execute(
        "SELECT name, current_setting(name) FROM pg_settings WHERE source = 'session'"
        " ORDER BY name = 'session_authorization' DESC, name = 'role' DESC, name"
    ).fetchall()
    if kept:
        calls = [
            psql.SQL("set_config({}, {}, false)").format(psql.Literal(name), psql.Literal(value))
            for name, value in kept
        ]
        reset.append(psql.SQL("SELECT {}").format(psql.SQL(", ").join(calls)))
    return durable, reset


def commit(conn: psycopg.Connection[Any], durable: psql.Composed, reset: Reset) -> bool:
    """COMMIT, durably, and put the session back as ``init`` left it; one round trip.

    A request may have changed the session in ways the lexer cannot see
    (``set_config(..., false)``, a function, ``conn.native`` in a call()).
    ``SET LOCAL synchronous_commit`` first makes this COMMIT as durable as
    the session's own setting, whatever the batch set; the RESETs after it
    undo every session value, so that no later batch inherits one. A
    session SET in a transaction that rolls back is undone by the server.

    Raises the `pg_errors.classify` exception of a COMMIT that failed (sent:
    the outcome may be unknown). Returns False when the COMMIT succeeded but
    the session could not be put back: the caller must drop the connection.
    """
    commit: psycopg.Cursor[Any] | None = None
    try:
        with conn.pipeline():
            conn.execute(durable)
            commit = conn.execute("COMMIT")
            for statement in reset:
                conn.execute(statement)
    except psycopg.Error as exc:
        if commit is None or commit.statusmessage != "COMMIT":
            raise classify(conn, exc, commit_sent=True) from exc
        # Committed; the session could not be put back: a new one is clean.
        log.error("mpwriter: resetting the PostgreSQL session failed; reconnecting: %s", exc)
        return False
    return True


def roll_back_open_transaction(conn: psycopg.Connection[Any]) -> None:
    """ROLLBACK, if ``conn`` is alive and in a transaction."""
    if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
        conn.execute("ROLLBACK")
