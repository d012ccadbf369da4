"""One request on PostgreSQL: its statements sent, its SET LOCAL put back, its result read.

`send` queues a request's statements on the writer's connection (inside
the engine's pipeline or savepoint) and returns the function that reads its
value once the results are in; a run of one SQL text goes as one
executemany (`run_end`, `queue_run`). Caller SQL is vetted and translated
by `prepare` (transaction control and session changes refused, SQLite's
placeholders rewritten: `pg_sql`). `Connection` is what a `call()`
function receives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
from psycopg import sql as psql

from .._errors import StatementRefused
from .._wire.frames import Kind
from .batch import SINGLE_STATEMENT, Work
from .pg_sql import (
    PlaceholderError,
    controls_transaction,
    local_settings,
    session_change,
    split_statements,
    translate,
)

Value = Any
Finish = Callable[[], Value]

REFUSED = (
    "transaction control is refused: every mpwriter request already runs atomically"
    " in the writer's transaction; send the statements without it (use"
    " Writer.transaction() to group several)"
)
_SINGLE = SINGLE_STATEMENT  # the requests one executemany may send together
# The shortest run sent as one executemany (`queue_run`): its results are
# fetched where it ends, a round trip in the middle of the pipeline, which
# the CPU saved pays for from about four statements on (measured: runs of 2
# no faster, of 4 even, of 8 a third less CPU per statement).
RUN_MIN = 4


class Cursor:
    """What `call()` functions get back from `Connection.execute`: a psycopg cursor, thin."""

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    lastrowid = None  # PostgreSQL has no rowid: use RETURNING

    @property
    def description(self) -> Any:
        return self._cursor.description

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._cursor.fetchall()

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._cursor)


class LocalSettings:
    """What one request changes with SET LOCAL, put back when the request ends.

    SET LOCAL lasts until the end of the transaction, which the requests of
    a batch share: the requests after it would run with its values. Before
    the request's first SET LOCAL of a setting, the setting's value is saved
    in a placeholder setting of the server (``mpwriter.savedN``), so that
    the pipelined statements need no result; `restore` sets it back from
    there. Only SET LOCAL the lexer reads (`pg_sql.local_settings`) is put
    back: not ``set_config(..., true)``, nor what ``conn.native`` runs.
    """

    __slots__ = ("_conn", "_saved")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._saved: dict[str, str] = {}

    def before(self, sql: str) -> None:
        """Save what ``sql`` is about to change with SET LOCAL, if not saved yet."""
        if not isinstance(sql, str):
            return  # refused by `_prepare`
        for name in local_settings(sql):
            if name not in self._saved:
                slot = f"mpwriter.saved{len(self._saved)}"
                self._saved[name] = slot
                self._conn.execute(
                    psql.SQL("SELECT set_config({}, current_setting({}, true), true)").format(
                        psql.Literal(slot), psql.Literal(name)
                    )
                )

    def restore(self) -> None:
        """Set every saved setting back (still within the request's savepoint)."""
        if not self._saved:
            return
        calls = [
            psql.SQL("set_config({}, current_setting({}), true)").format(
                psql.Literal(name), psql.Literal(slot)
            )
            for name, slot in self._saved.items()
        ]
        self._conn.execute(psql.SQL("SELECT {}").format(psql.SQL(", ").join(calls)))


class Connection:
    """The connection a `call()` function receives on PostgreSQL.

    ``execute`` and ``executemany`` take the same SQL and placeholders as the
    Writer's methods (``?``, ``:name``, or `mpwriter.native`). Transaction
    control is refused: the function runs inside the writer's transaction,
    in its own savepoint. ``native`` is the psycopg connection itself, for
    what this wrapper lacks; do not commit, roll back or close it.
    """

    def __init__(self, conn: psycopg.Connection[Any], settings: LocalSettings) -> None:
        self.native = conn
        self._settings = settings

    def execute(self, sql: str, params: Any = ()) -> Cursor:
        cursor = self.native.cursor()
        self._settings.before(sql)
        execute(cursor, sql, params)
        return Cursor(cursor)

    def executemany(self, sql: str, seq_of_params: Iterable[Any]) -> Cursor:
        cursor = self.native.cursor()
        self._settings.before(sql)
        executemany(cursor, sql, seq_of_params)
        return Cursor(cursor)

    def commit(self) -> None:
        raise StatementRefused(REFUSED)

    def rollback(self) -> None:
        raise StatementRefused(REFUSED)

    def transaction(self) -> None:
        raise StatementRefused(REFUSED)


def prepare(sql: str, params: Any) -> tuple[str, Any]:
    """The psycopg text and parameters for caller SQL; refuses transaction control."""
    if not isinstance(sql, str):
        # sqlite3 says as much; the lexer would fail somewhere inside instead.
        raise TypeError(f"the SQL must be a str, not {type(sql).__name__}")
    refuse_control(sql)
    try:
        text, style = translate(sql)
    except PlaceholderError as exc:
        raise psycopg.ProgrammingError(str(exc)) from None
    if style == "native":
        # psycopg reads % only when there are parameters: without, the text is as written.
        return text, params if params else None
    # With parameters (even none), psycopg turns the doubled %% back into %.
    return text, () if params is None else params


def refuse_control(sql: str) -> None:
    """Raise `StatementRefused` for SQL that would end the transaction or change the session."""
    if controls_transaction(sql):
        raise StatementRefused(REFUSED)
    reason = session_change(sql)
    if reason is not None:
        raise StatementRefused(
            f"refused: {reason}, which would change the writer's one connection for every"
            " later request of every caller; use SET LOCAL (it ends with the transaction)"
            " in the transaction() or call() that needs it, or set it for the writer's"
            " session in start(init=...);"
            " not applied"
        )


def execute(cursor: psycopg.Cursor[Any], sql: str, params: Any) -> None:
    text, values = prepare(sql, params)
    cursor.execute(text, values)


def executemany(cursor: psycopg.Cursor[Any], sql: str, seq_of_params: Iterable[Any]) -> None:
    text, _ = prepare(sql, ())
    cursor.executemany(text, seq_of_params)


def rowcount(cursor: psycopg.Cursor[Any]) -> tuple[int, None, list[Any]]:
    return (cursor.rowcount, None, [])


def written(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """``Result``'s fields: (rowcount, None, rows), plus the column names of a
    statement that has a result set (rows or not)."""
    description = cursor.description
    if description is None:
        return (cursor.rowcount, None, [])
    rows = cursor.fetchall()
    return (cursor.rowcount, None, rows, tuple(column.name for column in description))


def run_end(chunk: list[Work], start: int) -> int:
    """The end of the run of requests from ``start`` that one executemany can send.

    A run is single statements (``execute``, ``post``) of the same SQL text,
    each with parameters, and no SET LOCAL among them (`LocalSettings` puts
    those back one request at a time). A request that cannot join one ends
    the run: the statements keep their order.
    """
    first = chunk[start]
    sql = first.body[0]
    if (
        first.request.kind not in _SINGLE
        or not isinstance(sql, str)
        or not first.body[1]
        or local_settings(sql)
    ):
        return start + 1
    end = start + 1
    while end < len(chunk):
        work = chunk[end]
        if work.request.kind not in _SINGLE or work.body[0] != sql or not work.body[1]:
            break
        end += 1
    return end


def queue_run(conn: psycopg.Connection[Any], run: list[Work]) -> list[Finish]:
    """Send a run (`run_end`) as one pipelined executemany; return each request's finisher.

    One psycopg call for the run, where a cursor and an execute per request
    cost half as much again per statement (measured: 28 against 46 us of CPU
    per single-row insert, batches of 16). ``returning=True`` keeps a result
    per statement: its own rowcount and rows. The finishers must be called
    in the run's order: each reads its statement's result and moves on to
    the next.
    """
    text, _ = prepare(run[0].body[0], run[0].body[1])
    cursor = conn.cursor()
    cursor.executemany(text, [work.body[1] for work in run], returning=True)

    def finish() -> Value:
        value = written(cursor)
        cursor.nextset()
        return value

    return [finish] * len(run)


def send(conn: psycopg.Connection[Any], work: Work, settings: LocalSettings) -> Finish | None:
    """Send ``work``'s statements; return what computes its value once results are in.

    None for a `call()`, which the engine runs itself (under its time limit).
    """
    kind = work.request.kind
    body = work.body
    if kind == Kind.EXECUTE or kind == Kind.POST:
        cursor = conn.cursor()
        settings.before(body[0])
        execute(cursor, body[0], body[1])
        return lambda: written(cursor)
    if kind == Kind.EXECUTEMANY:
        cursor = conn.cursor()
        settings.before(body[0])
        executemany(cursor, body[0], body[1])
        return lambda: (cursor.rowcount, None, [])
    if kind == Kind.SCRIPT:
        for statement in split_statements(body[0]):
            refuse_control(statement)
            settings.before(statement)
            conn.cursor().execute(statement)
        return lambda: None
    if kind == Kind.TRANSACTION:
        parts: list[Finish] = []
        for many, sql, params in body[0]:
            cursor = conn.cursor()
            settings.before(sql)
            if many:
                executemany(cursor, sql, params)
                parts.append(functools.partial(rowcount, cursor))
            else:
                execute(cursor, sql, params)
                parts.append(functools.partial(written, cursor))
        return lambda: [part() for part in parts]
    if kind == Kind.CALL:
        return None
    raise ValueError(f"unknown request kind {kind}")
