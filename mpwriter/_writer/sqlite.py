"""The SQLite engine: group commit on the writer's one SQLite connection.

It owns what is SQLite's: the single-writer lock file, opening the database
(WAL, the chosen durability, foreign keys), the authorizer that vets callers'
statements, the progress handler and alarm that enforce execution limits,
waiting out outside lock holders (busy backoff), and the checkpoint at close.
The loop (`loop.py`) sees it only through `engine.Engine`.

A batch runs in one transaction, a request in its own SAVEPOINT.

Isolation: each request runs inside its own SAVEPOINT. A request that fails
is rolled back to its savepoint and answered with its own error; the others
still commit. A single statement needs no savepoint (SQLite undoes a failed
statement by itself), which saves two statements per request on the hot path.
If SQLite abandoned the whole transaction (``INSERT OR ROLLBACK``, a full
disk, an I/O error), or a failed statement left rows behind (``OR FAIL``),
the batch is replayed without the culprit, so a request never commits half
of what it did and no error reaches a request it does not concern. If the
COMMIT fails, every request of the batch gets that error.

The writer's own transaction statements are the only ones allowed: an
authorizer refuses BEGIN, COMMIT, END, ROLLBACK, SAVEPOINT and RELEASE from
callers (SQLite tells us what a statement does; we do not guess from its text).
Statements that SQLite will not run inside a transaction (VACUUM, changing
journal_mode or foreign_keys) are run alone after the batch commits.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import filelock

from .._errors import (
    Interrupted,
    NotPicklable,
    StatementRefused,
    WriterAlreadyRunning,
)
from .._wire.frames import Kind, Request, Status, encode_reply, encode_wrote
from .batch import Counters, Work, describe, error_reply

# Pragmas that SQLite ignores or refuses inside a transaction when they set a
# value; such a request is deferred and run alone, outside the batch.
_SOLO_PRAGMAS = frozenset({"foreign_keys", "journal_mode", "page_size", "auto_vacuum"})
_SOLO_MESSAGE = "within a transaction"  # "cannot VACUUM from within a transaction"

# A request stops waiting for an outside lock holder this long before its
# deadline, so that its "database is locked" error reaches the caller while the
# caller is still listening.
_DEADLINE_MARGIN = 0.02
_BACKOFF_FIRST = 0.001
_BACKOFF_MAX = 0.1

SQLITE_BUSY = 5

log = logging.getLogger("mpwriter")

_SINGLE_STATEMENT = frozenset({Kind.EXECUTE, Kind.POST})
# Kinds whose result is (rowcount, lastrowid, rows): without rows, it is sent
# in the compact form (`encode_wrote`).
_WRITE_RESULTS = frozenset({Kind.EXECUTE, Kind.EXECUTEMANY, Kind.POST})

# The writer's own statements. sqlite3 caches prepared statements by their
# text, and the authorizer runs only when a statement is prepared: a caller's
# "COMMIT" must never hit the cached, unvetted "COMMIT" of the writer, so the
# writer's texts carry a marker no caller sends by accident.
_BEGIN = "BEGIN IMMEDIATE /* mpwriter */"
_SAVEPOINT = "SAVEPOINT mpwriter_request /* mpwriter */"
_RELEASE = "RELEASE mpwriter_request /* mpwriter */"
_ROLLBACK_TO = "ROLLBACK TO mpwriter_request /* mpwriter */"
_COMMIT = "COMMIT /* mpwriter */"
_ROLLBACK = "ROLLBACK /* mpwriter */"
# Appended to a statement run alone, for the same reason: its unvetted cached
# form must not be found by the same text sent later inside a batch.
_SOLO_SUFFIX = "\n/* mpwriter solo */"


def lock_path(database: str) -> str:
    """The lock file that admits one writer per database file (the one rule)."""
    return os.path.abspath(database) + ".mpwriter.lock"


def claim(database: str) -> filelock.BaseFileLock:
    """Take the single-writer lock of ``database`` or raise `WriterAlreadyRunning`."""
    path = lock_path(database)
    lock = filelock.FileLock(path, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise WriterAlreadyRunning(
            f"another mpwriter writer already serves {database!r} (it holds {path!r})"
        ) from None
    return lock


def open_database(
    path: str, synchronous: str, init: str | Callable[[Any], object] | None
) -> sqlite3.Connection:
    """Open the write connection: WAL, the chosen durability, foreign keys on."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
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


class _CallOverrun(BaseException):
    """Raised by the alarm inside a `call()` function that ran past its limit.

    A BaseException, so that the function's own ``except Exception`` cannot
    swallow it.
    """


class _Refused(Exception):
    """Raised inside the runner to turn an authorizer denial into a reply."""


class _NeedsSolo(Exception):
    """The request must run outside any transaction."""


class _TransactionLost(Exception):
    """One request failed in a way that spoils the whole transaction.

    SQLite rolled it back, or the failed request left changes behind that no
    savepoint can undo; the batch is replayed without that request.
    """

    def __init__(self, index: int, reply: bytes) -> None:
        super().__init__(index)
        self.index = index
        self.reply = reply


class SqliteEngine:
    """Runs batches on the writer's SQLite connection; see the module docstring."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        counters: Counters,
        state: Any,
        execution_limit: float | None = None,
        lock: filelock.BaseFileLock | None = None,
    ) -> None:
        self._conn = conn
        self._lock = lock
        self._cursor = conn.cursor()  # reused: one request at a time
        self._counters = counters
        self._state = state
        self._execution_limit = execution_limit
        # When the running request must stop (its deadline, or its execution
        # limit if that comes first); published for the owner's watchdog.
        self._stop_at = 0.0
        self._in_call = False
        conn.set_progress_handler(self._progress, 1000)
        signal.signal(signal.SIGALRM, self._on_alarm)
        # While True, statements come from callers and are vetted.
        self._guarded = False
        self._denied: str | None = None
        self._wants_solo = False
        conn.set_authorizer(self._authorize)

    # -- authorizer ---------------------------------------------------------

    def _authorize(
        self, action: int, arg1: str | None, arg2: str | None, _db: str | None, _src: str | None
    ) -> int:
        if not self._guarded:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_TRANSACTION or action == sqlite3.SQLITE_SAVEPOINT:
            verb = "SAVEPOINT" if action == sqlite3.SQLITE_SAVEPOINT and arg1 == "BEGIN" else arg1
            self._denied = (
                f"{verb or 'transaction control'} is refused: every mpwriter request already"
                " runs atomically in the writer's transaction; send the statements without"
                " transaction control (use Writer.transaction() to group several)"
            )
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_ATTACH or action == sqlite3.SQLITE_DETACH:
            # An attached file would be written outside the lock that makes
            # this the only writer; and the attachment would outlive the request.
            self._denied = "ATTACH and DETACH are refused: a writer serves one database file"
            return sqlite3.SQLITE_DENY
        if (
            action == sqlite3.SQLITE_PRAGMA
            and arg2 is not None
            and (arg1 or "").lower() in _SOLO_PRAGMAS
        ):
            self._wants_solo = True
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _progress(self) -> int:
        """SQLite's progress handler: a non-zero answer interrupts the statement."""
        return 1 if self._guarded and time.monotonic() > self._stop_at else 0

    def _on_alarm(self, _signum: int, _frame: object) -> None:
        if self._in_call:
            self._in_call = False
            raise _CallOverrun

    # -- one request ----------------------------------------------------------

    def _perform(self, kind: int, body: tuple[Any, ...]) -> Any:
        conn = self._conn
        if kind == Kind.EXECUTE:
            return _execute(self._cursor, body[0], body[1])
        if kind == Kind.POST:
            self._counters.posts_dropped += body[2]
            return _execute(self._cursor, body[0], body[1])
        if kind == Kind.EXECUTEMANY:
            cursor = conn.executemany(body[0], body[1])
            return (cursor.rowcount, cursor.lastrowid, [])
        if kind == Kind.SCRIPT:
            for statement in split_script(body[0]):
                conn.execute(statement).fetchall()
            return None
        if kind == Kind.TRANSACTION:
            results: list[tuple[int, int | None, list[Any]]] = []
            for many, sql, params in body[0]:
                if many:
                    cursor = conn.executemany(sql, params)
                    results.append((cursor.rowcount, cursor.lastrowid, []))
                else:
                    results.append(_execute(self._cursor, sql, params))
            return results
        if kind == Kind.CALL:
            function: Callable[..., Any] = body[0]
            # Python code is not reached by the progress handler: an alarm
            # interrupts a function that runs past its limit.
            signal.setitimer(signal.ITIMER_REAL, max(0.001, self._stop_at - time.monotonic()))
            self._in_call = True
            try:
                return function(conn, *body[1], **body[2])
            finally:
                self._in_call = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        raise ValueError(f"unknown request kind {kind}")

    def _run_guarded(self, work: Work) -> bytes:
        """Run one request with caller statements vetted; return its OK reply.

        Raises `_Refused`, `_NeedsSolo` or the request's own exception.
        """
        self._denied = None
        self._wants_solo = False
        started = time.monotonic()
        stop_at = work.deadline
        if self._execution_limit is not None:
            stop_at = min(stop_at, started + self._execution_limit)
        self._stop_at = stop_at
        self._state.busy_until = stop_at
        self._guarded = True
        try:
            kind = work.request.kind
            if kind == Kind.EXECUTE:  # the common case, without a call per layer
                value = _execute(self._cursor, *work.body)
            else:
                value = self._perform(kind, work.body)
        except _CallOverrun:
            raise self._interrupted(started) from None
        except sqlite3.DatabaseError as exc:
            if self._denied is not None:
                raise _Refused(self._denied) from exc
            if self._wants_solo or _SOLO_MESSAGE in str(exc):
                raise _NeedsSolo from exc
            if time.monotonic() > stop_at and "interrupted" in str(exc):
                raise self._interrupted(started) from exc
            raise
        finally:
            self._guarded = False
        if kind in _WRITE_RESULTS and not value[2]:
            return encode_wrote(work.request.request_id, value[0], value[1])
        try:
            return encode_reply(work.request.request_id, Status.OK, value)
        except Exception as exc:
            raise NotPicklable(f"the result could not be pickled: {exc}") from exc

    def _interrupted(self, started: float) -> Interrupted:
        ran = time.monotonic() - started
        return Interrupted(
            f"interrupted after {ran:.3f} s at its execution limit; rolled back, not applied"
        )

    def _refusal(self, work: Work, refused: _Refused) -> bytes:
        self._counters.refused += 1
        return self._fail(work, StatementRefused(refused.args[0]))

    def _fail(self, work: Work, exc: BaseException) -> bytes:
        counters = self._counters
        counters.count_error(exc)
        if work.request.kind == Kind.POST:
            # Nobody waits for this reply: the log and the counts are all there is.
            name = type(exc).__qualname__
            counters.post_errors_by_class[name] = counters.post_errors_by_class.get(name, 0) + 1
            log.warning(
                "mpwriter: fire-and-forget write failed: %s: %s [%s]", name, exc, describe(work)
            )
        return error_reply(work.request.request_id, exc)

    def abandon_transaction(self) -> None:
        """Roll back whatever transaction is open, with the writer's own statement text."""
        if self._conn.in_transaction:
            self._conn.execute(_ROLLBACK)

    # -- the batch ------------------------------------------------------------

    def run(self, batch: list[Work]) -> list[tuple[Request, bytes]]:
        """Run ``batch`` in one transaction; return each request's reply.

        Replies are returned only once the transaction has committed (or
        failed); the caller sends them after this returns.
        """
        self._counters.batches += 1
        self._counters.requests += len(batch)
        replies: dict[int, bytes] = {}
        pending = self._begin(batch, replies)
        solo: list[tuple[Work, BaseException]] = []
        while pending:
            try:
                outcome = self._run_in_transaction(pending, solo)
            except _TransactionLost as lost:
                self._counters.replayed_batches += 1
                self.abandon_transaction()
                culprit = pending[lost.index]
                replies[id(culprit)] = lost.reply
                pending = pending[: lost.index] + pending[lost.index + 1 :]
                solo.clear()
                pending = self._begin(pending, replies)
                continue
            replies.update(outcome)
            break
        for work, cause in solo:
            replies[id(work)] = self._run_solo(work, cause)
        self._state.busy_until = 0.0
        return [(work.request, replies[id(work)]) for work in batch]

    def _begin(self, batch: list[Work], replies: dict[int, bytes]) -> list[Work]:
        """BEGIN IMMEDIATE, waiting out outside lock holders with backoff.

        Requests whose deadline comes first are answered with SQLite's
        "database is locked" error and left out; the rest are returned.
        """
        pending = list(batch)
        delay = _BACKOFF_FIRST
        while pending:
            try:
                self._conn.execute(_BEGIN)
                return pending
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    for work in pending:
                        replies[id(work)] = self._fail(work, exc)
                    return []
                busy = exc
            now = time.monotonic()
            still: list[Work] = []
            for work in pending:
                if work.deadline - _DEADLINE_MARGIN <= now:
                    replies[id(work)] = self._fail(work, busy)
                else:
                    still.append(work)
            pending = still
            if not pending:
                break
            self._counters.retries += 1
            earliest = min(work.deadline for work in pending) - _DEADLINE_MARGIN
            time.sleep(max(0.0, min(delay * random.uniform(0.5, 1.5), earliest - now)))
            delay = min(delay * 2, _BACKOFF_MAX)
        return []

    def _run_in_transaction(
        self, pending: list[Work], solo: list[tuple[Work, BaseException]]
    ) -> dict[int, bytes]:
        conn = self._conn
        replies: dict[int, bytes] = {}
        succeeded: list[Work] = []
        for index, work in enumerate(pending):
            # A single statement needs no savepoint: SQLite undoes a failed
            # statement by itself. Where it does not (OR FAIL keeps the rows
            # written before the failure, and an unencodable result must be
            # undone), the change count shows it and the batch is replayed.
            single = work.request.kind in _SINGLE_STATEMENT
            if single:
                changes = conn.total_changes
            else:
                conn.execute(_SAVEPOINT)
            try:
                replies[id(work)] = self._run_guarded(work)
            except _NeedsSolo as needs:
                solo.append((work, needs.__cause__ or needs))
            except _Refused as refused:
                replies[id(work)] = self._refusal(work, refused)
            except Exception as exc:
                reply = self._fail(work, exc)
                if not conn.in_transaction or (single and conn.total_changes != changes):
                    raise _TransactionLost(index, reply) from exc
                replies[id(work)] = reply
            else:
                if not single:
                    conn.execute(_RELEASE)
                succeeded.append(work)
                continue
            if not single:
                conn.execute(_ROLLBACK_TO)
                conn.execute(_RELEASE)
        try:
            conn.execute(_COMMIT)
        except sqlite3.Error as exc:
            self.abandon_transaction()
            for work in succeeded:
                replies[id(work)] = self._fail(work, exc)
        else:
            self._counters.commits += 1
        return replies

    def _run_solo(self, work: Work, cause: BaseException) -> bytes:
        """Run a statement that SQLite will not run inside a transaction.

        Only a single statement qualifies (``execute``); it was vetted when it
        was first prepared inside the batch, so it runs unguarded here -- VACUUM
        issues its own BEGIN internally.
        """
        if work.request.kind not in _SINGLE_STATEMENT:
            return self._fail(work, cause)
        sql, params = work.body[0], work.body[1]
        try:
            value = _execute(self._cursor, sql + _SOLO_SUFFIX, params)
            return encode_reply(work.request.request_id, Status.OK, value)
        except Exception as exc:
            return self._fail(work, exc)

    def close(self) -> None:
        """Roll back what is open, checkpoint, close, release the lock; logs failures."""
        conn = self._conn
        try:
            self.abandon_transaction()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("PRAGMA optimize")
        except sqlite3.Error:
            log.exception("mpwriter: checkpoint at shutdown failed")
        finally:
            conn.close()
            if self._lock is not None:
                self._lock.release()


def _execute(cursor: sqlite3.Cursor, sql: str, params: Any) -> tuple[Any, ...]:
    """``Result``'s fields: (rowcount, lastrowid, rows), and the column names
    only with rows, so that a write's reply stays the compact 3-tuple."""
    cursor.execute(sql, params)
    description = cursor.description
    if description is None:
        return (cursor.rowcount, cursor.lastrowid, [])
    # RETURNING rows must be fetched before rowcount is final.
    rows = cursor.fetchall()
    if not rows:
        return (cursor.rowcount, cursor.lastrowid, rows)
    return (cursor.rowcount, cursor.lastrowid, rows, tuple(column[0] for column in description))


def open_sqlite_engine(
    path: str,
    synchronous: str,
    init: str | Callable[[Any], object] | None,
    counters: Counters,
    state: Any,
    execution_limit: float | None,
) -> SqliteEngine:
    """Claim the database's lock, open it and return its engine.

    Raises `WriterAlreadyRunning` or the error that opening raised (the lock is
    then released).
    """
    lock = claim(path)
    try:
        conn = open_database(path, synchronous, init)
    except BaseException:
        lock.release()
        raise
    return SqliteEngine(conn, counters, state, execution_limit, lock)
