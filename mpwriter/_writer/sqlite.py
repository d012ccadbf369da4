"""The SQLite engine: group commit on the writer's one SQLite connection.

It owns what is SQLite's: the single-writer lock file, opening the database
(WAL, the chosen durability, foreign keys), the authorizer that vets callers'
statements, the progress handler and alarm that enforce execution limits,
waiting out outside lock holders (busy backoff), WAL checkpoints between
batches (`SqliteEngine.tidy`, never inside a COMMIT), and the checkpoint at
close. The loop (`loop.py`) sees it only through `engine.Engine`.

A batch runs in one transaction, a request in its own SAVEPOINT.

Isolation: each request runs inside its own SAVEPOINT. A request that fails
is rolled back to its savepoint and answered with its own error; the others
still commit. A single statement needs no savepoint (SQLite undoes a failed
statement by itself), which saves two statements per request on the hot path.
If SQLite abandoned the whole transaction (``INSERT OR ROLLBACK``, a full
disk, an I/O error), or a failed statement left rows behind (``OR FAIL``),
the batch is replayed without the culprit, so a request never commits half
of what it did and no error reaches a request it does not concern. A COMMIT
refused by a deferred constraint (a ``DEFERRABLE INITIALLY DEFERRED`` foreign
key, checked only then) has a culprit no savepoint saw: the batch is bisected
until it is found (`SqliteEngine.run`); it alone gets the error. A COMMIT that
fails otherwise (a full disk, an I/O error) fails every request of the batch.

The writer's own transaction statements are the only ones allowed: an
authorizer refuses BEGIN, COMMIT, END, ROLLBACK, SAVEPOINT and RELEASE from
callers (SQLite tells us what a statement does; we do not guess from its text).
Statements that SQLite will not run inside a transaction (VACUUM, changing
foreign_keys) are deferred: the batch commits and its replies go out, then
each runs alone (`run_alone`), with its own deadline published for the
watchdog. Settings the writer depends on (WAL, normal locking, its
durability, its own lock waits) are refused with `StatementRefused`.

`call()` functions run real Python in the writer, so they get more guards
than plain statements (which pay for none of them): a thread (`CallLimiter`)
interrupts a function past its stop time without the process timer or
SIGALRM, which the function may use itself; the connection refuses use from
any other thread (``check_same_thread``); after the function, the writer puts
back what it may have changed on the connection (authorizer, progress
handler, row and text factories, SIGALRM), refuses it if it changed what
cannot be put back mid-transaction, and checks that its result and its
exception can be rebuilt by the caller -- all before the COMMIT.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .. import testing
from .._errors import (
    Interrupted,
    NotPicklable,
    StatementRefused,
    Timeout,
)
from .._wire.frames import REPLY_HEADER_SIZE, Kind, Request, Status, encode_reply, encode_wrote
from . import forks
from .batch import (
    STOP_MARGIN,
    STOP_MARGIN_SHARE,
    Counters,
    Work,
    commit_cost,
    count_failure,
    error_reply,
    interrupted,
    stop_time,
)
from .call_limit import CallLimiter, CallOverrun, own_signals, restore_signals
from .claim import Claim
from .migrations import apply_sqlite as apply_migrations

# Pragmas that SQLite ignores or refuses inside a transaction when they set a
# value; such a request is deferred and run alone, outside the batch.
_SOLO_PRAGMAS = frozenset({"foreign_keys", "journal_mode", "page_size", "auto_vacuum"})

# Settings of the writer's connection that everything else relies on. Setting
# one to anything but the allowed values is refused, for a plain statement by
# the authorizer and for a call() by `_check_pinned` after the function.
# pragma -> (values allowed, why the others are refused)
_PINNED_PRAGMAS: dict[str, tuple[frozenset[str], str]] = {
    "journal_mode": (
        frozenset({"wal"}),
        "the writer's database stays in WAL mode: readers (mpwriter.reader()) and"
        " the writer's crash safety depend on it",
    ),
    "locking_mode": (
        frozenset({"normal"}),
        "EXCLUSIVE locking would keep every reader (mpwriter.reader()) locked out",
    ),
    "synchronous": (
        frozenset(),
        "durability is chosen once for every caller: mpwriter.start(synchronous=...)",
    ),
    "busy_timeout": (
        frozenset(),
        "the writer waits out outside lock holders itself, within each request's"
        " deadline; SQLite's busy handler would sleep past those deadlines",
    ),
    "query_only": (
        frozenset({"0", "false", "off", "no"}),
        "a read-only writer would fail every later request",
    ),
}
# Results whose pickle always unpickles (exact types, not subclasses): a
# call() returning one skips the check that its result can be rebuilt.
_ALWAYS_REBUILDS = frozenset({type(None), bool, int, float, str, bytes})

_SOLO_MESSAGE = "within a transaction"  # "cannot VACUUM from within a transaction"

# A request stops waiting for an outside lock holder this long before its
# deadline, so that its "database is locked" error reaches the caller while the
# caller is still listening.
_DEADLINE_MARGIN = 0.02
_BACKOFF_FIRST = 0.001
_BACKOFF_MAX = 0.1

SQLITE_BUSY = 5

# Checkpoints run off the commit path (SQLite's own autocheckpoint is moved
# out of the way on the writer's connection): when the loop is idle and the WAL holds at least
# this many frames not yet copied back (SQLite's default autocheckpoint
# threshold); or, if no idle moment comes, after a batch's replies were sent
# once it holds the backstop's number.
IDLE_CHECKPOINT_FRAMES = 1000
BACKSTOP_CHECKPOINT_FRAMES = 4000
# SQLite's own autocheckpoint stays on far above those, as a safety net: if
# reading the wal-index ever went wrong, the WAL still could not grow unbounded.
SAFETY_NET_CHECKPOINT_FRAMES = 10 * BACKSTOP_CHECKPOINT_FRAMES
# The wal-index header (https://www.sqlite.org/walformat.html, 2.2): mxFrame,
# the last valid frame, at byte 16; nBackfill, the last frame copied back into
# the database, at byte 96; both 32-bit in the host's byte order.
_WAL_INDEX = struct.Struct("=16xI76xI")

log = logging.getLogger("mpwriter")

_SINGLE_STATEMENT = frozenset({Kind.EXECUTE, Kind.POST})
# Kinds whose result is (rowcount, lastrowid, rows): without rows, it is sent
# in the compact form (`encode_wrote`).
_WRITE_RESULTS = frozenset({Kind.EXECUTE, Kind.EXECUTEMANY, Kind.POST})
# Plain ints and a plain status for the per-request path: reading a member
# off an enum class costs ~0.3 us on Python 3.11, comparing ints 0.02.
_EXECUTE = int(Kind.EXECUTE)
_CALL = int(Kind.CALL)
_POST = int(Kind.POST)
_OK = Status.OK

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
# What `_check_pinned` reads after a call() function (one statement, cached).
_PINNED_NOW = (
    "SELECT * FROM pragma_locking_mode, pragma_query_only, pragma_busy_timeout,"
    " pragma_synchronous /* mpwriter */"
)


class WriterConnection(sqlite3.Connection):
    """The writer's connection: it notes when anyone replaces one of its callbacks.

    Installing an authorizer makes SQLite expire every prepared statement, so
    the writer cannot put its own back after every call() just in case: doing
    so cut read-modify-write throughput 3.5x (each statement prepared again,
    the authorizer run ~12 times per call). A call() function that replaces the
    authorizer, the progress handler or the trace callback -- through ``conn``
    or a cursor's ``.connection``, the same object -- is noted here, and only
    then does the writer restore its own and re-check the pinned settings.
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


class _Refused(Exception):
    """Raised inside the runner to turn an authorizer denial into a reply."""


class _NeedsSolo(Exception):
    """The request must run outside any transaction."""


class _TransactionLost(Exception):
    """One request failed in a way that spoils the whole transaction.

    SQLite rolled it back, or the failed request left changes behind that no
    savepoint can undo; the batch is replayed without that request.
    """

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index)
        self.index = index
        self.error = error


class _CommitRefused(Exception):
    """The COMMIT failed on a deferred constraint (a ``DEFERRABLE INITIALLY
    DEFERRED`` foreign key, or any under ``PRAGMA defer_foreign_keys``);
    the transaction was rolled back. Some request of it is the culprit.
    """

    def __init__(self, error: sqlite3.IntegrityError) -> None:
        super().__init__(error)
        self.error = error

    def culprit_error(self) -> sqlite3.IntegrityError:
        """What the culprit is answered: SQLite's error, saying what it means."""
        return deferred_violation(self.error, "this request leaves it violated")


def deferred_violation(error: sqlite3.IntegrityError, whose: str) -> sqlite3.IntegrityError:
    """SQLite's error of a COMMIT refused by a deferred constraint, saying what it means.

    ``whose`` names the culprit. The class and SQLite's error code stay, so
    the caller gets the `IntegrityError` sqlite3's own ``commit()`` raises.
    """
    told = sqlite3.IntegrityError(
        f"{error} (a deferred constraint, checked at COMMIT: {whose}); rolled back, not applied"
    )
    for name in ("sqlite_errorcode", "sqlite_errorname"):  # Python 3.11+
        if hasattr(error, name):
            setattr(told, name, getattr(error, name))
    told.__cause__ = error
    return told


class SqliteEngine:
    """Runs batches on the writer's SQLite connection; see the module docstring."""

    def __init__(
        self,
        conn: WriterConnection,
        counters: Counters,
        state: Any,
        execution_limit: float | None = None,
        lock: Claim | None = None,
    ) -> None:
        self._conn = conn
        self._lock = lock
        self._cursor = conn.cursor()  # reused: one request at a time
        # The writer's transaction statements (BEGIN, SAVEPOINT, RELEASE,
        # COMMIT) run on a cursor of their own: conn.execute makes a new
        # cursor each time (~0.3 us; a call() costs two of them).
        self._control = conn.cursor()
        self._counters = counters
        self._state = state
        self._execution_limit = execution_limit
        # When the running request must stop (its deadline, or its execution
        # limit if that comes first); published for the owner's watchdog.
        self._stop_at = 0.0
        conn.set_progress_handler(self._progress, 1000)
        self._signal_mask = own_signals()
        self._limiter: CallLimiter | None = None
        self._authorizer_was_replaced = False  # by the last call(): `_restore_connection`
        # What a call() function may change and the writer puts back after it.
        self._row_factory = conn.row_factory
        self._text_factory = conn.text_factory
        self._synchronous = conn.execute("PRAGMA synchronous /* mpwriter */").fetchone()[0]
        # Set when a call() changed sqlite3's transaction handling: put back
        # between batches, where that cannot commit anything.
        self._repair_transaction_control = False
        # While True, statements come from callers and are vetted.
        self._guarded = False
        # While True, a statement running alone is held to its stop time.
        self._alone = False
        # While True, callers' own savepoints are allowed (an interactive
        # session's statements, `session.py`); the writer's never are.
        self.session_savepoints = False
        # True while the open transaction holds an interactive session's
        # committed work, waiting for the next batch's COMMIT (`session.py`).
        self.carrying_session = False
        self._denied: str | None = None
        self._wants_solo = False
        # Requests deferred by the last `run`, each to run alone (`run_alone`).
        self._deferred: list[tuple[Work, BaseException]] = []
        # Failures answered but not yet counted: `_fail`, `_settle`.
        self._failures: list[tuple[Work, BaseException]] = []
        conn.set_authorizer(self._authorize)
        conn.callbacks_changed = False  # the writer's own: nothing to restore yet
        # SQLite's autocheckpoint would run inside the COMMIT that crosses its
        # threshold, before that batch's replies are sent; `tidy` runs it
        # between batches instead, when it can tell how full the WAL is. Set
        # after the user's init, which could otherwise lower it again.
        self._wal_index = _open_wal_index(conn)
        if self._wal_index is not None:
            conn.execute(f"PRAGMA wal_autocheckpoint={SAFETY_NET_CHECKPOINT_FRAMES}")
        forks.in_forked_child(self._refuse_in_child)
        self.checkpoints = 0  # attempted by `tidy`
        self.commit_seconds = 0.0
        # Frames the last checkpoint could not copy back (a reader's snapshot
        # needed them); not counted as due again.
        self._left_behind = 0

    def _refuse_in_child(self) -> None:
        """In a child forked by a call() function: its copy of the connection
        refuses every statement (`forks`).

        The copy shares the database's files and the -shm mapping with the
        writer, and believes it holds the writer's locks: a COMMIT from it
        would write beside the writer's. Setting an authorizer expires every
        prepared statement, so the cached ones are vetted again too.
        """
        if self._wal_index is not None:
            forks.blank([self._wal_index])
        try:
            self._conn.set_authorizer(_refuse_all)
            self._conn.set_progress_handler(_stop_now, 1)
        except sqlite3.ProgrammingError:
            # Forked from a thread of the function's: the connection refuses
            # that thread already (check_same_thread), and the writer's thread
            # is not in the child to come back.
            return

    # -- authorizer ---------------------------------------------------------

    def _authorize(
        self, action: int, arg1: str | None, arg2: str | None, _db: str | None, _src: str | None
    ) -> int:
        if not self._guarded:
            return sqlite3.SQLITE_OK
        if (
            action == sqlite3.SQLITE_SAVEPOINT
            and self.session_savepoints
            and not (arg2 or "").lower().startswith("mpwriter")
        ):
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
        if action == sqlite3.SQLITE_PRAGMA and arg2 is not None:
            name = (arg1 or "").lower()
            pinned = _PINNED_PRAGMAS.get(name)
            if pinned is not None and arg2.strip().lower() not in pinned[0]:
                self._denied = f"PRAGMA {name}={arg2} is refused: {pinned[1]}"
                return sqlite3.SQLITE_DENY
            if name in _SOLO_PRAGMAS:
                self._wants_solo = True
                return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _progress(self) -> int:
        """SQLite's progress handler: a non-zero answer interrupts the statement."""
        return 1 if (self._guarded or self._alone) and time.monotonic() > self._stop_at else 0

    # -- one request ----------------------------------------------------------

    def _perform(self, kind: int, body: tuple[Any, ...]) -> Any:
        conn = self._conn
        if kind == Kind.EXECUTE:
            return _execute(self._cursor, body[0], body[1])
        if kind == Kind.POST:
            return _execute(self._cursor, body[0], body[1])
        if kind == Kind.EXECUTEMANY:
            # body[1] is a list, or a streamed request's `StreamedRows`: an
            # iterable that sqlite3 reads as it goes, one unpickled chunk held
            # at a time; iterating again (a replayed batch) starts over.
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
        raise ValueError(f"unknown request kind {kind}")

    def _run_call(self, request_id: int, body: tuple[Any, ...]) -> bytes:
        """Run a call() function under `CallLimiter`; return its checked OK reply.

        Raises `CallOverrun` if it ran past its stop time (even if it caught
        that), `_Refused` if it changed what the writer depends on, the
        function's exception (a BaseException that is not an Exception comes
        as `RemoteError`), or `NotPicklable` if its result cannot be rebuilt
        by the caller. Whatever happens, the connection is put back as it was.
        """
        function: Callable[..., Any] = body[0]
        limiter = self._limiter
        if limiter is None:
            limiter = self._limiter = CallLimiter(self._conn.interrupt)

        def call() -> tuple[Any, bytes]:
            value = function(self._conn, *body[1], **body[2])
            # Pickled under the limit too: a result's __reduce__ is the
            # function's code as well.
            try:
                return value, encode_reply(request_id, _OK, value)
            except Exception as exc:
                raise NotPicklable(f"the result could not be pickled: {exc}") from exc

        value, reply = limiter.run(self._stop_at, call, self._restore_connection)
        self._check_pinned(self._authorizer_was_replaced)
        if type(value) in _ALWAYS_REBUILDS:
            return reply
        try:
            pickle.loads(memoryview(reply)[REPLY_HEADER_SIZE:])
        except BaseException as exc:
            raise NotPicklable(
                f"the result pickles but cannot be unpickled ({type(exc).__qualname__}:"
                f" {exc}); rolled back, not applied"
            ) from exc
        return reply

    def _restore_connection(self) -> None:
        """Put back what a call() function may have changed; cheap, runs after each.

        Notes in ``_authorizer_was_replaced`` whether the function replaced
        the authorizer: pragmas change through statements, which the
        authorizer vets, so only then can a pinned one have changed
        (`_check_pinned`).
        """
        conn = self._conn
        self._authorizer_was_replaced = conn.callbacks_changed
        if conn.callbacks_changed:
            conn.set_authorizer(self._authorize)
            conn.set_progress_handler(self._progress, 1000)
            conn.set_trace_callback(None)
            conn.callbacks_changed = False
        conn.row_factory = self._row_factory
        conn.text_factory = self._text_factory
        restore_signals(self._signal_mask)

    def _check_pinned(self, authorizer_replaced: bool) -> None:
        """Refuse a call() that changed what cannot be put back mid-transaction.

        A function may remove the authorizer and then set any pragma, or
        switch sqlite3's own transaction handling: the request is then
        refused and rolled back, and the writer restores the setting. The
        pragmas are read back (~10 us) only if the authorizer was replaced.
        """
        conn = self._conn
        changed: list[str] = []
        if conn.isolation_level is not None:
            changed.append(f"isolation_level={conn.isolation_level!r}")
        if getattr(conn, "autocommit", -1) != -1:  # sqlite3.LEGACY_TRANSACTION_CONTROL
            changed.append(f"autocommit={getattr(conn, 'autocommit', None)!r}")
        if not authorizer_replaced and not changed:
            return
        guarded, self._guarded = self._guarded, False
        try:
            locking, query_only, busy_timeout, synchronous = conn.execute(_PINNED_NOW).fetchone()
        finally:
            self._guarded = guarded
        repairs: list[str] = []
        if str(locking).lower() != "normal":
            changed.append(f"locking_mode={locking}")
            repairs.append("PRAGMA locking_mode=NORMAL /* mpwriter */")
        if query_only:
            changed.append("query_only=1")
            repairs.append("PRAGMA query_only=0 /* mpwriter */")
        if busy_timeout != 0:
            changed.append(f"busy_timeout={busy_timeout}")
            repairs.append("PRAGMA busy_timeout=0 /* mpwriter */")
        if synchronous != self._synchronous:  # SQLite refuses this in a transaction
            changed.append(f"synchronous={synchronous}")
        if changed:
            guarded, self._guarded = self._guarded, False
            try:
                for repair in repairs:
                    conn.execute(repair).fetchall()
            finally:
                self._guarded = guarded
            # Switching these back would COMMIT on some Pythons: done between batches.
            self._repair_transaction_control = True
            raise _Refused(
                f"the call() function changed {', '.join(changed)} on the writer's connection,"
                " which every later request depends on; it was rolled back and the setting"
                " restored"
            )

    def _run_guarded(self, work: Work) -> bytes:
        """Run one request with caller statements vetted; return its OK reply.

        Raises `_Refused`, `_NeedsSolo` or the request's own exception.
        """
        self._denied = None
        self._wants_solo = False
        started = time.monotonic()
        # `stop_time`, inlined: the call cost 0.5 us per request on the test
        # machine, a fifth of what a small INSERT costs the engine.
        deadline = work.deadline
        margin = (deadline - work.sent_at) * STOP_MARGIN_SHARE
        stop_at = deadline - (margin if margin < STOP_MARGIN else STOP_MARGIN)
        limit = self._execution_limit
        if limit is not None and started + limit < stop_at:
            stop_at = started + limit
        self._stop_at = stop_at
        self._state.busy_until = stop_at
        self._guarded = True
        try:
            kind = work.request.kind
            if kind == _EXECUTE:  # the common case, without a call per layer
                value = _execute(self._cursor, *work.body)
            elif kind == _CALL:
                return self._run_call(work.request.request_id, work.body)
            else:
                value = self._perform(kind, work.body)
        except CallOverrun:
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
            return encode_reply(work.request.request_id, _OK, value)
        except Exception as exc:
            raise NotPicklable(f"the result could not be pickled: {exc}") from exc

    def _interrupted(self, started: float) -> Interrupted:
        """The error of the request that started at ``started`` and was stopped."""
        limit = self._execution_limit
        by_limit = limit is not None and self._stop_at == started + limit
        return interrupted(time.monotonic() - started, by_limit)

    def _refusal(self, work: Work, refused: _Refused) -> bytes:
        return self._fail(work, StatementRefused(refused.args[0]))

    def _fail(self, work: Work, exc: BaseException) -> bytes:
        """``work``'s error reply; the error is counted once it is final (`_settle`).

        A replayed batch runs a request again and may fail it again: only the
        attempt whose outcome stands is counted (and logged).
        """
        self._failures.append((work, exc))
        return error_reply(work.request.request_id, exc)

    def _settle(self) -> None:
        """Count (and log) the failures recorded since the last settling: they stand."""
        failures, self._failures = self._failures, []
        for work, exc in failures:
            count_failure(self._counters, work, exc)

    def abandon_transaction(self) -> None:
        """Roll back whatever transaction is open, with the writer's own statement text."""
        if self._conn.in_transaction:
            self._conn.execute(_ROLLBACK)

    # -- the batch ------------------------------------------------------------

    def run(self, batch: list[Work]) -> list[tuple[Request, bytes]]:
        """Run ``batch`` in one transaction; return the replies it has now.

        Replies are returned only once the transaction has committed (or
        failed); the caller sends them after this returns. A request that
        must run alone is left out and deferred to `run_alone`.

        Replays: a request that spoils the transaction (`_TransactionLost`)
        is answered with its error and the batch runs again without it. A
        COMMIT refused by a deferred constraint (`_CommitRefused`) has a
        culprit that no savepoint noticed: the batch is bisected -- its
        first half run and committed if it can be, else halved again --
        until the first request whose addition makes the COMMIT fail is
        alone; it is answered with the error, and the rest runs on (and is
        bisected again if another culprit is in it). The innocent requests
        commit, in their order. Nothing of this costs a batch that commits.
        """
        counters = self._counters
        counters.batches += 1
        counters.requests += len(batch)
        for work in batch:
            if work.request.kind == _POST:
                # Here, once: a replayed batch runs its posts again.
                counters.posts_dropped += work.body[2]
        self._failures = []  # a `run` that raised left its own: they did not stand
        replies: dict[int, bytes] = {}
        solo: list[tuple[Work, BaseException]] = []
        pending = batch
        # The length of a prefix of ``pending`` known to fail at COMMIT.
        suspects: int | None = None
        while pending:
            before = len(pending)
            pending = self._begin(pending, replies)
            if len(pending) != before:
                suspects = None  # some waited out their deadline: the prefix changed
            size = len(pending) if suspects is None else max(1, suspects // 2)
            attempt = pending[:size]
            recorded = len(self._failures)
            attempt_solo: list[tuple[Work, BaseException]] = []
            try:
                outcome = self._run_in_transaction(attempt, attempt_solo)
            except _TransactionLost as lost:
                self.carrying_session = False  # its work is gone: session.py tells it
                self.abandon_transaction()
                del self._failures[recorded:]  # this attempt's outcome does not stand
                counters.replayed_batches += 1
                culprit = attempt[lost.index]
                replies[id(culprit)] = self._fail(culprit, lost.error)
                pending = [work for work in pending if work is not culprit]
                suspects = None
                continue
            except _CommitRefused as refused:
                del self._failures[recorded:]
                if self.carrying_session:
                    # The refused COMMIT held a session's work too, which may be
                    # what it refused: the batch runs again without it first.
                    self.carrying_session = False
                    counters.replayed_batches += 1
                    continue
                if len(pending) > 1:
                    counters.replayed_batches += 1  # some of it runs again
                if size == 1:
                    replies[id(attempt[0])] = self._fail(attempt[0], refused.culprit_error())
                    pending = pending[1:]
                    suspects = None
                else:
                    suspects = size
                continue
            replies.update(outcome)
            solo.extend(attempt_solo)
            pending = pending[size:]
            if suspects is not None:
                suspects = suspects - size if suspects > size else None
        self.carrying_session = False
        self._settle()
        self._state.busy_until = 0.0
        if self._repair_transaction_control:
            self._repair_transaction_control = False
            self._conn.isolation_level = None  # no transaction is open: commits nothing
            if hasattr(self._conn, "autocommit"):
                self._conn.autocommit = -1  # type: ignore[assignment,unused-ignore]
        self._deferred = solo
        return [(work.request, replies[id(work)]) for work in batch if id(work) in replies]

    def run_alone(self) -> Iterator[tuple[Request, bytes]]:
        """Run the requests the last `run` deferred, one at a time; yield each reply.

        Each is a unit of its own, after the batch's replies were sent: its
        own deadline (or execution limit) stops it and is published for the
        watchdog, and a long VACUUM holds back no other reply.
        """
        deferred, self._deferred = self._deferred, []
        for work, cause in deferred:
            reply = self._run_solo(work, cause)
            self._settle()
            yield work.request, reply

    def _begin(self, batch: list[Work], replies: dict[int, bytes]) -> list[Work]:
        """BEGIN IMMEDIATE, waiting out outside lock holders with backoff.

        Requests whose deadline comes first are answered with SQLite's
        "database is locked" error and left out; the rest are returned.
        """
        pending = list(batch)
        if self._conn.in_transaction:
            # An interactive session's committed work (`session.py`), kept
            # open for this batch's COMMIT to make it durable with the rest.
            return pending
        delay = _BACKOFF_FIRST
        while pending:
            try:
                self._control.execute(_BEGIN)
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
        control = self._control
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
                control.execute(_SAVEPOINT)
            try:
                replies[id(work)] = self._run_guarded(work)
            except _NeedsSolo as needs:
                solo.append((work, needs.__cause__ or needs))
            except _Refused as refused:
                replies[id(work)] = self._refusal(work, refused)
            except Exception as exc:
                if not conn.in_transaction or (single and conn.total_changes != changes):
                    raise _TransactionLost(index, exc) from exc
                replies[id(work)] = self._fail(work, exc)
            else:
                if not single:
                    control.execute(_RELEASE)
                succeeded.append(work)
                continue
            if not single:
                control.execute(_ROLLBACK_TO)
                control.execute(_RELEASE)
        started = time.monotonic()
        try:
            control.execute(_COMMIT)
        except sqlite3.Error as exc:
            # A COMMIT refused by a deferred constraint leaves the transaction
            # open (SQLite's rule); any other failure is nobody's fault.
            deferred = exc if isinstance(exc, sqlite3.IntegrityError) else None
            if not conn.in_transaction:
                deferred = None
            self.abandon_transaction()
            if deferred is not None and succeeded:
                raise _CommitRefused(deferred) from exc
            for work in succeeded:
                replies[id(work)] = self._fail(work, exc)
        else:
            self._counters.commits += 1
            self.commit_seconds = commit_cost(self.commit_seconds, started, time.monotonic())
        return replies

    def _run_solo(self, work: Work, cause: BaseException) -> bytes:
        """Run a statement that SQLite will not run inside a transaction.

        Only a single statement qualifies (``execute``); it was vetted when it
        was first prepared inside the batch, so it runs unguarded here -- VACUUM
        issues its own BEGIN internally -- but held to its own stop time.
        """
        if work.request.kind not in _SINGLE_STATEMENT:
            return self._fail(work, cause)
        if testing.faults.solo_delay:
            self._state.busy_until = work.deadline
            time.sleep(testing.faults.solo_delay)  # sleep-ok: a fault: a long VACUUM
        started = time.monotonic()
        if work.deadline <= started:
            self._counters.expired += 1
            return self._fail(
                work, Timeout("the deadline passed while earlier requests ran; not applied")
            )
        stop_at, _ = stop_time(work, started, self._execution_limit)
        self._stop_at = stop_at
        self._state.busy_until = stop_at
        sql, params = work.body[0], work.body[1]
        self._alone = True
        try:
            value = _execute(self._cursor, sql + _SOLO_SUFFIX, params)
            return encode_reply(work.request.request_id, Status.OK, value)
        except sqlite3.OperationalError as exc:
            if time.monotonic() > stop_at and "interrupted" in str(exc):
                return self._fail(work, self._interrupted(started))
            return self._fail(work, exc)
        except Exception as exc:
            return self._fail(work, exc)
        finally:
            self._alone = False
            self._state.busy_until = 0.0

    # -- checkpoints -------------------------------------------------------------

    def unchecked_frames(self) -> int:
        """WAL frames not yet copied back into the database (a hint, not a promise).

        Read from the wal-index header in the -shm file: one pread, no lock,
        so a value torn by a concurrent update is possible and harmless here.
        """
        if self._wal_index is None:
            return 0  # no -shm to read: SQLite's autocheckpoint stays on
        header = os.pread(self._wal_index, _WAL_INDEX.size, 0)
        if len(header) < _WAL_INDEX.size:
            return 0  # not initialised yet: nothing written
        last_frame, backfilled = _WAL_INDEX.unpack(header)
        return max(0, int(last_frame) - int(backfilled))

    def tidy(self, idle: bool) -> None:
        """Checkpoint the WAL if it is due, between batches.

        ``idle``: nothing is in hand or queued, so no caller waits on this;
        the WAL is checkpointed once it holds `IDLE_CHECKPOINT_FRAMES`. Under
        sustained load (never idle) it is checkpointed once it holds
        `BACKSTOP_CHECKPOINT_FRAMES`, after the batch's replies were sent.
        Either way nothing commits between the checkpoint and the next batch,
        so a complete checkpoint lets that batch rewind the WAL to its start
        (a checkpoint from another thread never could). PASSIVE: it never
        waits for readers; a reader's open snapshot just leaves frames for
        the next time -- and the next attempt waits until as many new frames
        again have come, so that a long read does not cost every batch a
        checkpoint. Failures are logged: the next commit stays correct.
        """
        if self._wal_index is None or self._conn.in_transaction:
            return  # SQLite's autocheckpoint stays on without a -shm to read
        header = os.pread(self._wal_index, _WAL_INDEX.size, 0)  # as unchecked_frames()
        if len(header) < _WAL_INDEX.size:
            return
        last_frame, backfilled = _WAL_INDEX.unpack(header)
        due = IDLE_CHECKPOINT_FRAMES if idle else BACKSTOP_CHECKPOINT_FRAMES
        if last_frame - backfilled - self._left_behind < due:
            return
        self.checkpoints += 1
        try:
            row = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            log.exception("mpwriter: checkpoint failed")
            return
        # (busy, frames in the WAL, frames copied back): what a reader kept.
        self._left_behind = max(0, row[1] - row[2]) if row else 0

    def close(self) -> None:
        """Roll back what is open, checkpoint, close, release the lock; logs failures."""
        conn = self._conn
        if self._wal_index is not None:
            os.close(self._wal_index)
            self._wal_index = None
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


def _refuse_all(*_args: object) -> int:
    return sqlite3.SQLITE_DENY


def _stop_now() -> int:
    return 1


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


def _open_wal_index(conn: sqlite3.Connection) -> int | None:
    """A read-only descriptor of the database's -shm file, or None if it has none
    (an in-memory database, or ``locking_mode=EXCLUSIVE``, keeps it in memory)."""
    row = conn.execute("PRAGMA database_list").fetchone()
    if not row or not row[2]:
        return None
    try:
        return os.open(row[2] + "-shm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def open_sqlite_engine(
    path: str,
    synchronous: str,
    init: str | Callable[[Any], object] | None,
    counters: Counters,
    state: Any,
    execution_limit: float | None,
    migrations: Sequence[str | Callable[[Any], object]] = (),
) -> SqliteEngine:
    """Claim the database's lock, open it and return its engine.

    Raises `WriterAlreadyRunning` or the error that opening raised (the lock is
    then released).
    """
    lock = Claim(path)
    try:
        conn = open_database(path, synchronous, init)
        apply_migrations(conn, migrations, split_script)
    except BaseException:
        lock.release()
        raise
    return SqliteEngine(conn, counters, state, execution_limit, lock)
