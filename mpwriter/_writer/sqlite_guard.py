"""What guards the writer's connection while a caller's request runs on it.

`Guard.run` runs one request -- a statement, a script, a transaction's
statements or a call() function -- with the caller's statements vetted by
SQLite's authorizer and held to the request's stop time by the progress
handler. It raises `Refused` for what the writer does not allow (transaction
control, ATTACH, a pinned setting: `_PINNED_PRAGMAS`), `NeedsSolo` for what
SQLite will not run inside a transaction (VACUUM, changing foreign_keys), or
the request's own error. The engine (`sqlite.py`) decides what each outcome
means for the batch; the guard knows nothing of batches.

`call()` functions run real Python in the writer, so they get more guards
than plain statements (which pay for none of them): a thread (`CallLimiter`)
interrupts a function past its stop time without the process timer or
SIGALRM, which the function may use itself; the connection refuses use from
any other thread (``check_same_thread``); after the function, the guard puts
back what it may have changed on the connection (authorizer, progress
handler, row and text factories, SIGALRM), refuses it if it changed what
cannot be put back mid-transaction, and checks that its result and its
exception can be rebuilt by the caller -- all before the COMMIT.
"""

from __future__ import annotations

import pickle
import sqlite3
import time
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from .._errors import Interrupted, NotPicklable
from .._wire.frames import REPLY_HEADER_SIZE, Kind, Status, encode_reply, encode_rows, encode_wrote
from .batch import STOP_MARGIN, STOP_MARGIN_SHARE, Work, interrupted, ok_reply
from .call_limit import CallLimiter, CallOverrun, own_signals, restore_signals
from .sqlite_connection import WriterConnection, execute, split_script

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
# Plain ints and a plain status for the per-request path: reading a member
# off an enum class costs far more than comparing ints.
_EXECUTE = int(Kind.EXECUTE)
_CALL = int(Kind.CALL)
_OK = Status.OK
# A column's name, from its entry in a cursor's ``description``: mapped in C,
# where a generator cost a Python call per column.
_name = itemgetter(0)
# What `_check_pinned` reads after a call() function (one statement, cached).
# The locking mode is compared in SQL: an ``init`` may have set a text
# factory (bytes, bytearray, a function) that changes what Python would see.
_PINNED_NOW = (
    "SELECT lower(locking_mode) <> 'normal', * FROM pragma_locking_mode, pragma_query_only,"
    " pragma_busy_timeout, pragma_synchronous /* mpwriter */"
)


class Refused(Exception):
    """An authorizer denial (or a call() that changed a pinned setting); its
    message is the `StatementRefused` the caller is answered with."""


class NeedsSolo(Exception):
    """The request must run outside any transaction."""


class Guard:
    """Runs callers' requests on the writer's connection, vetted and bounded."""

    def __init__(self, conn: WriterConnection, state: Any, execution_limit: float | None) -> None:
        self._conn = conn
        self._cursor = conn.cursor()  # reused: one request at a time
        self._state = state
        self._execution_limit = execution_limit
        # When the running request must stop (its deadline, or its execution
        # limit if that comes first); published for the owner's watchdog.
        self.stop_at = 0.0
        conn.set_progress_handler(self._progress, 1000)
        self._signal_mask = own_signals()
        self._limiter: CallLimiter | None = None
        self._authorizer_was_replaced = False  # by the last call(): `_restore_connection`
        # What a call() function may change and the guard puts back after it.
        self._row_factory = conn.row_factory
        self._text_factory = conn.text_factory
        # Result sets go marshalled (`encode_rows`) only while the rows are
        # plain tuples of values marshal keeps exactly: it turns a bytearray
        # or memoryview (a text factory ``init`` set) into bytes.
        self._marshal_rows = self._row_factory is None and self._text_factory in (str, bytes)
        self._synchronous = conn.execute("PRAGMA synchronous /* mpwriter */").fetchone()[0]
        # Set when a call() changed sqlite3's transaction handling: put back
        # between batches (`repair_between_batches`).
        self._repair_transaction_control = False
        # While True, statements come from callers and are vetted.
        self._guarded = False
        # While True, a statement running alone is held to its stop time.
        self.alone = False
        # While True, callers' own savepoints are allowed (an interactive
        # session's statements, `session.py`); the writer's never are.
        self.session_savepoints = False
        self._denied: str | None = None
        self._wants_solo = False
        conn.set_authorizer(self._authorize)
        conn.callbacks_changed = False  # the writer's own: nothing to restore yet

    def run_alone(self, sql: str, params: Any, stop_at: float) -> tuple[Any, ...]:
        """Run one statement outside any transaction, unvetted but held to
        ``stop_at``; its result (`execute`)."""
        self.stop_at = stop_at
        self.alone = True
        try:
            return execute(self._cursor, sql, params)
        finally:
            self.alone = False

    def refuse_all(self) -> None:
        """In a child forked by a call() function: its copy of the connection
        refuses every statement (`forks`).

        The copy shares the database's files with the writer and believes it
        holds the writer's locks: a COMMIT from it would write beside the
        writer's. Setting an authorizer expires every prepared statement, so
        the cached ones are vetted again too.
        """
        try:
            self._conn.set_authorizer(_refuse_all)
            self._conn.set_progress_handler(_stop_now, 1)
        except sqlite3.ProgrammingError:
            # Forked from a thread of the function's: the connection refuses
            # that thread already (check_same_thread), and the writer's thread
            # is not in the child to come back.
            return

    def repair_between_batches(self) -> None:
        """Put back sqlite3's transaction handling if a call() changed it.

        Only between batches: no transaction is open, so switching it back
        commits nothing.
        """
        if self._repair_transaction_control:
            self._repair_transaction_control = False
            self._conn.isolation_level = None
            if hasattr(self._conn, "autocommit"):
                self._conn.autocommit = -1  # type: ignore[assignment,unused-ignore]

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
        return 1 if (self._guarded or self.alone) and time.monotonic() > self.stop_at else 0

    # -- one request ----------------------------------------------------------

    def _perform(self, kind: int, body: tuple[Any, ...]) -> Any:
        conn = self._conn
        if kind == Kind.EXECUTE:
            return execute(self._cursor, body[0], body[1])
        if kind == Kind.POST:
            return execute(self._cursor, body[0], body[1])
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
                    results.append(execute(self._cursor, sql, params))
            return results
        raise ValueError(f"unknown request kind {kind}")

    def _run_call(self, request_id: int, body: tuple[Any, ...]) -> bytes:
        """Run a call() function under `CallLimiter`; return its checked OK reply.

        Raises `CallOverrun` if it ran past its stop time (even if it caught
        that), `Refused` if it changed what the writer depends on, the
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

        value, reply = limiter.run(self.stop_at, call, self._restore_connection)
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
        pragmas are read back only if the authorizer was replaced.
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
            row = conn.execute(_PINNED_NOW).fetchone()
            not_normal, locking, query_only, busy_timeout, synchronous = row
        finally:
            self._guarded = guarded
        repairs: list[str] = []
        if not_normal:
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
            raise Refused(
                f"the call() function changed {', '.join(changed)} on the writer's connection,"
                " which every later request depends on; it was rolled back and the setting"
                " restored"
            )

    def run(self, work: Work) -> bytes:
        """Run one request with caller statements vetted; return its OK reply.

        Raises `Refused`, `NeedsSolo` or the request's own exception.
        """
        self._denied = None
        self._wants_solo = False
        started = time.monotonic()
        # `stop_time`, inlined: this runs for every request.
        deadline = work.deadline
        margin = (deadline - work.sent_at) * STOP_MARGIN_SHARE
        stop_at = deadline - (margin if margin < STOP_MARGIN else STOP_MARGIN)
        limit = self._execution_limit
        if limit is not None and started + limit < stop_at:
            stop_at = started + limit
        self.stop_at = stop_at
        self._state.busy_until = stop_at
        self._guarded = True
        try:
            kind = work.request.kind
            if kind == _EXECUTE:  # the common case: `execute` and `ok_reply`, inlined
                cursor = self._cursor
                cursor.execute(*work.body)
                description = cursor.description
                if description is None:
                    return encode_wrote(work.request.request_id, cursor.rowcount, cursor.lastrowid)
                rows = cursor.fetchall()  # RETURNING rows: fetched before rowcount is final
                value = (cursor.rowcount, cursor.lastrowid, rows, tuple(map(_name, description)))
                # The factories are put back after every call(), so what was
                # decided when they were saved holds (`_marshal_rows`).
                try:
                    if self._marshal_rows:
                        return encode_rows(work.request.request_id, value)
                    return encode_reply(work.request.request_id, _OK, value)
                except Exception as exc:
                    raise NotPicklable(f"the result could not be pickled: {exc}") from exc
            elif kind == _CALL:
                return self._run_call(work.request.request_id, work.body)
            else:
                value = self._perform(kind, work.body)
        except CallOverrun:
            raise self.stopped(started) from None
        except sqlite3.DatabaseError as exc:
            if self._denied is not None:
                raise Refused(self._denied) from exc
            if self._wants_solo or _SOLO_MESSAGE in str(exc):
                raise NeedsSolo from exc
            if time.monotonic() > stop_at and "interrupted" in str(exc):
                raise self.stopped(started) from exc
            raise
        finally:
            self._guarded = False
        return ok_reply(work.request.request_id, kind, value)

    def stopped(self, started: float) -> Interrupted:
        """The error of the request that started at ``started`` and was stopped."""
        limit = self._execution_limit
        by_limit = limit is not None and self.stop_at == started + limit
        return interrupted(time.monotonic() - started, by_limit)


def _refuse_all(*_args: object) -> int:
    return sqlite3.SQLITE_DENY


def _stop_now() -> int:
    return 1
