"""The PostgreSQL engine: group commit on the writer's one psycopg connection.

One connection per writer process, opened after the process started (never
inherited across a fork) and reopened with backoff when it is lost. Several
writers (one per machine) may serve the same database: nothing here assumes
it is the only one, so there is no lock file.

A batch runs as one transaction on the fast path below, which takes no
savepoints. Where savepoints are needed (a `call()`, a held request, a
replay after a failure) it is cut into chunks of at most 64 requests, each
chunk one transaction: PostgreSQL caches 64 subtransactions per
transaction, and more savepoints than that slow the whole server and its
replicas.

The error-free case (fast path), the whole batch::

    pipeline: BEGIN; time limits; every request's statements   -> one round trip
              (a run of one SQL text: one executemany, `_queue_run`)
    results read and encoded;
    pipeline: SET LOCAL synchronous_commit; COMMIT; RESETs     -> one round trip

No savepoints: they would double the statements (measured in issue 11:
16,325 rows/s without, 8,206 with, batches of 16). When a statement fails,
PostgreSQL abandons the transaction; the chunk is rolled back and replayed
on the isolated path: one request at a time, each in its own SAVEPOINT, so a
failed request is rolled back to its savepoint and answered with its own
error while the others commit. A chunk with a `call()` takes the isolated
path directly (the function reads results as it goes).

Serialization failures and deadlocks (SQLSTATE 40001, 40P01) roll the chunk
back and replay it after a jittered backoff, then one request per
transaction. A COMMIT that fails otherwise (a deferred constraint) is
replayed one request per transaction, so only the culprit gets the error.

Replies are encoded before COMMIT and returned after it. If the connection is
lost before COMMIT was sent, nothing was applied (`ServerUnavailable`); if it
is lost after, the outcome is unknown (`OutcomeUnknown`).

Callers' transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE,
...) is refused before it is sent (`StatementRefused`); the SQL text is
vetted by `pg_sql.controls_transaction`, since PostgreSQL would just run it.

The session is every caller's: statements that change it beyond the
transaction (SET without LOCAL, RESET, DISCARD...) are refused the same way
(`pg_sql.session_change`), and what the text cannot show is undone by the
RESETs sent with every COMMIT (`_commit`).

A statement waits on a lock at most `LOCK_SLICE` (lock_timeout): a request
that waits longer on a lock held outside the writer is rolled back to its
savepoint and held, unanswered, while the others commit; the loop serves it
again with the next batch, until it gets the lock or its deadline.
"""

from __future__ import annotations

import functools
import logging
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql as psql
from psycopg.pq import TransactionStatus

from .._errors import (
    Interrupted,
    OutcomeUnknown,
    ServerUnavailable,
    StatementRefused,
    carry_cause,
)
from .._wire.frames import Kind, Request
from . import forks
from .batch import (
    DEADLINE_MARGIN,
    SINGLE_STATEMENT,
    Counters,
    Failures,
    Work,
    back_off,
    commit_cost,
    count_batch,
    expired,
    interrupted,
    ok_reply,
    out_of_time,
    stop_time,
)
from .call_limit import CallLimiter, CallOverrun, own_signals, restore_signals
from .migrations import apply_postgres as apply_migrations
from .pg_sql import (
    PlaceholderError,
    controls_transaction,
    local_settings,
    session_change,
    split_statements,
    translate,
)

log = logging.getLogger("mpwriter")

# A call() function's Python is interrupted this long after its stop time,
# when the server's statement_timeout has stopped its SQL already (at most
# half the time left before its deadline: its caller must hear `Interrupted`).
_PYTHON_GRACE = 0.1
# PostgreSQL keeps 64 subtransactions per transaction in its cache (PGPROC_MAX_CACHED_SUBXIDS).
MAX_CHUNK = 64
_RETRYABLE = frozenset({"40001", "40P01"})  # serialization failure, deadlock detected
_QUERY_CANCELED = "57014"  # statement_timeout
_LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout (and NOWAIT)
# The longest a statement of a shared transaction waits on a lock held outside
# the writer before its request is set aside and tried again in a later batch:
# while it waits, the writer's one connection serves nobody else. It is also
# what all the lock waits of one isolated pass may take together, so that a
# table lock held outside costs a batch LOCK_SLICE, not LOCK_SLICE a request.
LOCK_SLICE = 0.1
# A statement's lock wait once that budget is spent: time enough for a lock
# that another writer's COMMIT is about to release.
_LOCK_WAIT_MIN = 0.005
# "cannot run inside a transaction block" (VACUUM, CREATE INDEX CONCURRENTLY...):
# a single statement so refused runs alone after the batch (`run_alone`).
_NOT_IN_TRANSACTION = "25001"
_ALONE = SINGLE_STATEMENT
_SINGLE = SINGLE_STATEMENT  # the requests one executemany may send together
# The shortest run sent as one executemany (`_queue_run`): its results are
# fetched where it ends, a round trip in the middle of the pipeline, which
# the CPU saved pays for from about four statements on (measured: runs of 2
# no faster, of 4 even, of 8 a third less CPU per statement).
_RUN_MIN = 4
_SHUTDOWN = frozenset({"57P01", "57P02", "57P03"})  # admin/crash shutdown, starting up
_MAX_RETRIES = 4
_BACKOFF_FIRST = 0.005
_BACKOFF_MAX = 0.5
_CONNECT_BACKOFF_MAX = 1.0
ISOLATION_LEVELS = {"read committed": "READ COMMITTED", "serializable": "SERIALIZABLE",
                    "repeatable read": "REPEATABLE READ"}  # fmt: skip

_REFUSED = (
    "transaction control is refused: every mpwriter request already runs atomically"
    " in the writer's transaction; send the statements without it (use"
    " Writer.transaction() to group several)"
)

Value = Any
Finish = Callable[[], Value]


class _Retryable(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _StatementFailed(Exception):
    """A statement failed on the fast path: replay on the isolated path."""


class _CommitFailed(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Lost(Exception):
    """The connection broke; ``commit_sent`` says whether COMMIT may have run."""

    def __init__(self, error: BaseException, commit_sent: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.commit_sent = commit_sent


def sendable(exc: BaseException) -> BaseException:
    """``exc``, or a copy that pickles with its class, sqlstate and message.

    psycopg's errors pickle (they drop the connection); one carrying an
    unpicklable attribute is rebuilt from its class and message, keeping
    the server's diagnostics that are plain bytes. Anything else that does
    not pickle is left to `error_reply`'s `RemoteError`.
    """
    try:
        pickle.dumps(exc)
    except Exception:
        if isinstance(exc, psycopg.Error):
            return _rebuilt(exc)
    return exc


def _rebuilt(exc: psycopg.Error) -> psycopg.Error:
    copy = type(exc)(*[str(arg) for arg in exc.args])
    info = getattr(exc, "_info", None)
    if isinstance(info, dict):
        copy._info = {k: v for k, v in info.items() if isinstance(v, bytes | None)}
    return copy


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
        _execute(cursor, sql, params)
        return Cursor(cursor)

    def executemany(self, sql: str, seq_of_params: Iterable[Any]) -> Cursor:
        cursor = self.native.cursor()
        self._settings.before(sql)
        _executemany(cursor, sql, seq_of_params)
        return Cursor(cursor)

    def commit(self) -> None:
        raise StatementRefused(_REFUSED)

    def rollback(self) -> None:
        raise StatementRefused(_REFUSED)

    def transaction(self) -> None:
        raise StatementRefused(_REFUSED)


def _prepare(sql: str, params: Any) -> tuple[str, Any]:
    """The psycopg text and parameters for caller SQL; refuses transaction control."""
    if not isinstance(sql, str):
        # sqlite3 says as much; the lexer would fail somewhere inside instead.
        raise TypeError(f"the SQL must be a str, not {type(sql).__name__}")
    _refuse_control(sql)
    try:
        text, style = translate(sql)
    except PlaceholderError as exc:
        raise psycopg.ProgrammingError(str(exc)) from None
    if style == "native":
        # psycopg reads % only when there are parameters: without, the text is as written.
        return text, params if params else None
    # With parameters (even none), psycopg turns the doubled %% back into %.
    return text, () if params is None else params


def _refuse_control(sql: str) -> None:
    """Raise `StatementRefused` for SQL that would end the transaction or change the session."""
    if controls_transaction(sql):
        raise StatementRefused(_REFUSED)
    reason = session_change(sql)
    if reason is not None:
        raise StatementRefused(
            f"refused: {reason}, which would change the writer's one connection for every"
            " later request of every caller; use SET LOCAL (it ends with the transaction)"
            " in the transaction() or call() that needs it, or set it for the writer's"
            " session in start(init=...);"
            " not applied"
        )


def _execute(cursor: psycopg.Cursor[Any], sql: str, params: Any) -> None:
    text, values = _prepare(sql, params)
    cursor.execute(text, values)


def _executemany(cursor: psycopg.Cursor[Any], sql: str, seq_of_params: Iterable[Any]) -> None:
    text, _ = _prepare(sql, ())
    cursor.executemany(text, seq_of_params)


def _rowcount(cursor: psycopg.Cursor[Any]) -> tuple[int, None, list[Any]]:
    return (cursor.rowcount, None, [])


def _written(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """``Result``'s fields: (rowcount, None, rows), plus the column names of a
    statement that has a result set (rows or not)."""
    description = cursor.description
    if description is None:
        return (cursor.rowcount, None, [])
    rows = cursor.fetchall()
    return (cursor.rowcount, None, rows, tuple(column.name for column in description))


class PostgresEngine:
    """Runs batches on the writer's one PostgreSQL connection; see the module docstring."""

    def __init__(
        self,
        dsn: str,
        init: str | Callable[[Any], object] | None,
        counters: Counters,
        state: Any,
        isolation: str = "read committed",
        execution_limit: float | None = None,
    ) -> None:
        self._dsn = dsn
        self._execution_limit = execution_limit
        self._init = init
        self._counters = counters
        self._state = state
        self.commit_seconds = 0.0
        self._begin = f"BEGIN ISOLATION LEVEL {ISOLATION_LEVELS[isolation]}"
        self._conn: psycopg.Connection[Any] | None = None
        # Sent with every COMMIT (see `_connect`): the session's durability
        # for the COMMIT, and what puts the session back as `init` left it.
        self._durable: psql.Composed = psql.Composed([])
        self._reset: list[psql.SQL | psql.Composed] = []
        # Requests set aside after waiting LOCK_SLICE on a lock; tried again
        # in a later batch (the loop serves again what `run` left unanswered).
        self._held: set[tuple[int, int]] = set()
        # Error replies answered but not yet counted: they are once they stand.
        self._failures = Failures(counters)
        # When each request of the current `run` was first sent: its stop
        # time (`batch.stop_time`) counts from there, replays included.
        self._started: dict[tuple[int, int], float] = {}
        # Requests the last `run` deferred: they cannot run in a transaction.
        self._deferred: list[Work] = []
        # call() functions run under a `CallLimiter`, started at the first.
        self._signal_mask = own_signals()
        self._limiter: CallLimiter | None = None
        self._connect(connect_timeout=10)

    # -- the connection -----------------------------------------------------------

    def _connect(self, connect_timeout: int) -> None:
        """Open the connection and run ``init``.

        Raises `ServerUnavailable` (its cause psycopg's error) if the server
        cannot be reached or refuses the connection (down, full, no such
        role...), and ``init``'s own error if that fails.
        """
        try:
            conn = psycopg.connect(
                self._dsn,
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
            if self._init is not None:
                with conn.transaction():
                    if isinstance(self._init, str):
                        for statement in split_statements(self._init):
                            conn.execute(statement)
                    else:
                        self._init(conn)
            self._durable, self._reset = _session_baseline(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _ensure_connected(self, chunk: list[Work], replies: dict[int, bytes]) -> list[Work]:
        """Reconnect with backoff if needed; return the requests still to run.

        A request whose deadline comes while the server cannot be reached is
        answered `ServerUnavailable` (not applied); the others wait on.
        """
        if self._conn is not None and not self._conn.broken:
            return chunk
        self._drop_connection()
        delay = _BACKOFF_FIRST
        while chunk:
            remaining = min(work.deadline for work in chunk) - DEADLINE_MARGIN - time.monotonic()
            try:
                self._connect(connect_timeout=int(max(1.0, remaining)))
                log.warning("mpwriter: connected to PostgreSQL again")
                return chunk
            except ServerUnavailable as exc:
                reason = str(exc)
            except psycopg.Error as exc:
                reason = f"init failed on the new connection: {exc}"
            now = time.monotonic()
            failure = ServerUnavailable(f"{reason}; not applied")
            still = []
            for work in chunk:
                if out_of_time(work, now):
                    replies[id(work)] = self._fail(work, failure)
                else:
                    still.append(work)
            chunk = still
            if chunk:
                self._counters.retries += 1
                back_off(chunk, delay, now)
                delay = min(delay * 2, _CONNECT_BACKOFF_MAX)
        return chunk

    # -- the Engine protocol ------------------------------------------------------

    def run(self, batch: list[Work]) -> list[tuple[Request, bytes]]:
        held = self._held
        if held:
            # A held request comes back at the head of the next batch, or expired.
            held.intersection_update(_key(work) for work in batch)
            # Counted when it first came.
            count_batch(self._counters, [work for work in batch if _key(work) not in held])
        else:
            count_batch(self._counters, batch)
        self._failures.clear()  # a `run` that raised left its own: they did not stand
        self._started.clear()
        replies: dict[int, bytes] = {}
        if self._pipelinable(batch):
            self._run_chunk(batch, replies)  # no savepoints: one transaction for all
        else:
            for start in range(0, len(batch), MAX_CHUNK):
                self._run_chunk(batch[start : start + MAX_CHUNK], replies)
        self._failures.settle()
        self._state.busy_until = 0.0
        # A request deferred to `run_alone`, or held, has no reply yet.
        return [(work.request, replies[id(work)]) for work in batch if id(work) in replies]

    def run_alone(self) -> Iterator[tuple[Request, bytes]]:
        """Run the statements PostgreSQL refused inside a transaction (VACUUM, ...).

        Each runs alone, outside any transaction, after the batch's replies
        went out, stopped at its own deadline by statement_timeout.
        """
        deferred, self._deferred = self._deferred, []
        for work in deferred:
            replies: dict[int, bytes] = {}
            pending = self._ensure_connected(self._drop_expired([work], replies), replies)
            if pending:
                replies[id(work)] = self._run_one_alone(work)
            self._failures.settle()
            yield work.request, replies[id(work)]
        self._state.busy_until = 0.0

    def _run_one_alone(self, work: Work) -> bytes:
        conn = self._conn
        assert conn is not None
        self._state.busy_until = work.deadline
        self._started[_key(work)] = time.monotonic()  # a unit of its own
        try:
            timeout = psql.Literal(_millis(self._stop_time(work)[0]))
            conn.execute(psql.SQL("SET statement_timeout = {}").format(timeout))
            try:
                cursor = conn.cursor()
                _execute(cursor, work.body[0], work.body[1])
                return _ok(work, _written(cursor))
            finally:
                if not conn.broken:
                    conn.execute("RESET statement_timeout")
        except psycopg.Error as exc:
            if exc.sqlstate == _QUERY_CANCELED:
                return self._fail(work, self._interrupted(work))
            return self._fail(work, exc)
        except Exception as exc:
            return self._fail(work, exc)

    def tidy(self, idle: bool) -> None:
        """No upkeep between batches: the server checkpoints and vacuums by itself."""

    def abandon_transaction(self) -> None:
        if self._conn is not None:
            _roll_back_open_transaction(self._conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            _roll_back_open_transaction(conn)
        except psycopg.Error:
            log.exception("mpwriter: rolling back at close failed")
        finally:
            conn.close()

    # -- one chunk ------------------------------------------------------------------

    def _pipelinable(self, chunk: list[Work]) -> bool:
        """Whether ``chunk`` may try the pipelined path: no call(), no held request."""
        held = self._held
        return not any(
            work.request.kind == Kind.CALL or (held and _key(work) in held) for work in chunk
        )

    def _run_chunk(self, chunk: list[Work], replies: dict[int, bytes]) -> None:
        """Run ``chunk`` in one transaction (pipelined, else isolated), or in
        smaller ones after a failure; every request gets its reply."""
        pipelined = self._pipelinable(chunk)
        attempts = 0
        while True:
            chunk = self._ensure_connected(self._drop_expired(chunk, replies), replies)
            if not chunk:
                return
            try:
                if pipelined:
                    self._run_pipelined(chunk, replies)
                else:
                    self._run_isolated(chunk, replies)
                return
            except _Lost as lost:
                self._drop_connection()
                attempts += 1
                if lost.commit_sent or attempts > _MAX_RETRIES:
                    self._answer_lost(chunk, replies, lost)
                    return
                # Nothing was applied: reconnect (within the deadlines) and replay.
                log.warning("mpwriter: lost the PostgreSQL connection before COMMIT: %s", lost)
            except _Retryable as retry:
                self._rollback()
                attempts += 1
                if attempts > _MAX_RETRIES:
                    self._one_by_one(chunk, replies, retry.error)
                    return
                self._counters.retries += 1
                self._backoff(attempts, chunk)
            except _StatementFailed:
                self._rollback()
                self._counters.replayed_batches += 1
                if len(chunk) > MAX_CHUNK:
                    # The isolated path's savepoints: at most MAX_CHUNK a
                    # transaction. Each part tries the pipelined path first.
                    for start in range(0, len(chunk), MAX_CHUNK):
                        self._run_chunk(chunk[start : start + MAX_CHUNK], replies)
                    return
                pipelined = False
            except _CommitFailed as failed:
                self._rollback()
                self._one_by_one(chunk, replies, failed.error)
                return

    def _one_by_one(
        self, chunk: list[Work], replies: dict[int, bytes], error: BaseException
    ) -> None:
        """Smaller batches: each request in its own transaction; alone, its error is its own."""
        if len(chunk) == 1:
            replies[id(chunk[0])] = self._fail(chunk[0], error)
            return
        self._counters.replayed_batches += 1
        for work in chunk:
            self._run_chunk([work], replies)

    def _drop_expired(self, chunk: list[Work], replies: dict[int, bytes]) -> list[Work]:
        now = time.monotonic()
        kept = []
        for work in chunk:
            if work.deadline <= now:
                self._counters.expired += 1
                replies[id(work)] = self._fail(work, expired())
            else:
                kept.append(work)
        return kept

    def _backoff(self, attempts: int, chunk: list[Work]) -> None:
        back_off(chunk, min(_BACKOFF_MAX, _BACKOFF_FIRST * 2**attempts), time.monotonic())

    def _rollback(self) -> None:
        try:
            self.abandon_transaction()
        except psycopg.Error as exc:
            if self._conn is None or not self._conn.broken:
                raise
            log.warning("mpwriter: connection lost during ROLLBACK: %s", exc)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _answer_lost(self, chunk: list[Work], replies: dict[int, bytes], lost: _Lost) -> None:
        log.warning("mpwriter: lost the PostgreSQL connection: %s", lost.error)
        for work in chunk:
            if id(work) in replies:
                continue  # already answered with its own error, rolled back
            if lost.commit_sent:
                error: BaseException = OutcomeUnknown(
                    f"the connection to PostgreSQL was lost after COMMIT was sent ({lost.error});"
                    " the outcome is unknown"
                )
            else:
                error = ServerUnavailable(
                    f"the connection to PostgreSQL was lost before COMMIT ({lost.error});"
                    " not applied"
                )
            replies[id(work)] = self._fail(work, error)

    def _classify(
        self, exc: psycopg.Error, commit_sent: bool, *, replayable: bool = True
    ) -> Exception:
        """The control-flow exception for an error of the engine's transaction.

        ``replayable``: whether a statement's failure may send the chunk to
        the isolated path; on that path it cannot help, so the chunk is split.
        """
        conn = self._conn
        state = exc.sqlstate or ""
        # Class 08 (connection exception) and the server shutting down (57P01-3)
        # end the session even when libpq has not noticed the socket closing yet.
        if (
            conn is None
            or conn.broken
            or state.startswith("08")
            or state in _SHUTDOWN
            or _connection_failed(exc)
        ):
            return _Lost(exc, commit_sent)
        if state in _RETRYABLE:
            return _Retryable(exc)
        return _StatementFailed() if replayable and not commit_sent else _CommitFailed(exc)

    def _commit(self, conn: psycopg.Connection[Any]) -> None:
        """COMMIT, durably, and put the session back as `init` left it; one round trip.

        A request may have changed the session in ways the lexer cannot see
        (``set_config(..., false)``, a function, ``conn.native`` in a call()).
        ``SET LOCAL synchronous_commit`` first makes this COMMIT as durable as
        the session's own setting, whatever the batch set; the RESETs after it
        undo every session value, so that no later batch inherits one. A
        session SET in a transaction that rolls back is undone by the server.
        """
        started = time.monotonic()
        commit: psycopg.Cursor[Any] | None = None
        try:
            with conn.pipeline():
                conn.execute(self._durable)
                commit = conn.execute("COMMIT")
                for statement in self._reset:
                    conn.execute(statement)
        except psycopg.Error as exc:
            if commit is None or commit.statusmessage != "COMMIT":
                raise self._classify(exc, commit_sent=True) from exc
            # Committed; the session could not be put back: a new one is clean.
            log.error("mpwriter: resetting the PostgreSQL session failed; reconnecting: %s", exc)
            self._drop_connection()
        self._counters.commits += 1
        self.commit_seconds = commit_cost(self.commit_seconds, started, time.monotonic())

    def _run_pipelined(self, chunk: list[Work], replies: dict[int, bytes]) -> None:
        conn = self._conn
        assert conn is not None
        self._state.busy_until = max(work.deadline for work in chunk)
        finishers: list[Finish] = []
        try:
            with conn.pipeline():
                conn.execute(self._begin)
                # Each statement may run until the last caller's stop time, but
                # waits on a lock at most until the first caller's deadline: all
                # wait for it. A statement stopped sends the chunk to the isolated
                # path, where each request has its own stop time.
                earliest = min(work.deadline for work in chunk)
                stop_at = max(self._stop_time(work)[0] for work in chunk)
                conn.execute(self._time_limits(stop_at, earliest))
                start = 0
                while start < len(chunk):
                    end = _run_end(chunk, start)
                    if end - start >= _RUN_MIN:
                        finishers += _queue_run(conn, chunk[start:end])
                    else:
                        finishers += [self._queue(conn, work) for work in chunk[start:end]]
                    start = end
        except psycopg.Error as exc:
            raise self._classify(exc, commit_sent=False) from exc
        except Exception as exc:  # refused statement, unpicklable params...
            raise _StatementFailed from exc
        encoded: list[bytes] = []
        try:
            for work, finish in zip(chunk, finishers, strict=True):
                encoded.append(_ok(work, finish()))
        except Exception as exc:
            raise _StatementFailed from exc
        self._commit(conn)
        for work, reply in zip(chunk, encoded, strict=True):
            replies[id(work)] = reply

    def _run_isolated(self, chunk: list[Work], replies: dict[int, bytes]) -> None:
        """Each request in its own savepoint; its failure is its own."""
        conn = self._conn
        assert conn is not None
        succeeded: dict[int, bytes] = {}
        # Encoded (and counted, logged) only once committed: a replay redoes them.
        failed: list[tuple[Work, BaseException]] = []
        alone: list[Work] = []
        held: list[Work] = []
        locks_until = time.monotonic() + LOCK_SLICE  # the pass's lock-wait budget
        try:
            conn.execute(self._begin)
            for work in chunk:
                _check_transaction_open(conn)
                self._state.busy_until = work.deadline
                lock_until = max(locks_until, time.monotonic() + _LOCK_WAIT_MIN)
                stop_at = self._stop_time(work)[0]
                conn.execute(self._time_limits(stop_at, min(work.deadline, lock_until)))
                try:
                    with conn.transaction(savepoint_name="mpwriter_request"):
                        succeeded[id(work)] = _ok(work, self._queue(conn, work)())
                except psycopg.Error as exc:
                    if conn.broken or exc.sqlstate in _RETRYABLE or _connection_failed(exc):
                        raise
                    if exc.sqlstate == _NOT_IN_TRANSACTION and work.request.kind in _ALONE:
                        alone.append(work)  # VACUUM and the like: after the batch
                        continue
                    error: BaseException = exc
                    if _lock_timed_out(exc):
                        if self._may_hold(work):
                            held.append(work)
                            continue
                        error = Interrupted(
                            f"waited on a lock held by another transaction until its deadline"
                            f" ({exc}); rolled back, not applied"
                        )
                    elif exc.sqlstate == _QUERY_CANCELED:
                        error = self._interrupted(work)
                    failed.append((work, error))
                except Exception as exc:  # refused, unpicklable result, the function's own
                    failed.append((work, exc))
        except psycopg.Error as exc:
            # Nothing of this attempt was committed: the replay (or the
            # "not applied" answer) replaces every reply computed here.
            raise self._classify(exc, commit_sent=False, replayable=False) from exc
        _check_transaction_open(conn)
        self._commit(conn)
        for work, error in failed:
            replies[id(work)] = self._fail(work, error)
        replies.update(succeeded)
        self._deferred.extend(alone)
        for work in held:
            # No reply: the loop serves it again in a later batch, where it
            # runs on the isolated path at once.
            self._held.add(_key(work))
        for work in chunk:
            if id(work) in replies:
                self._held.discard(_key(work))

    def _time_limits(self, stop_at: float, lock_deadline: float) -> psql.Composed:
        """SET LOCAL statement_timeout and lock_timeout, in one statement.

        statement_timeout: the server stops SQL that runs past ``stop_at``
        (`_stop_time`). lock_timeout: a statement's wait on a lock
        ends at ``lock_deadline`` or after `LOCK_SLICE`, whichever comes
        first: a request that waits longer on a lock held outside the writer
        is set aside (`_may_hold`) and tried again after the others' replies,
        rather than holding them.
        """
        now = time.monotonic()
        lock_end = min(lock_deadline - DEADLINE_MARGIN, now + LOCK_SLICE)
        lock_millis = max(1, int((lock_end - now) * 1000))
        return psql.SQL(
            "SELECT set_config('statement_timeout', {}, true), set_config('lock_timeout', {}, true)"
        ).format(psql.Literal(str(_millis(stop_at))), psql.Literal(str(lock_millis)))

    def _may_hold(self, work: Work) -> bool:
        """Whether ``work``, stopped by its lock_timeout, may be tried again in a later batch.

        Not past its deadline; and not a streamed executemany, whose rows the
        loop releases once the batch is answered.
        """
        if out_of_time(work, time.monotonic()):
            return False
        return work.request.kind != Kind.EXECUTEMANY or isinstance(work.body[1], list | tuple)

    def _stop_time(self, work: Work) -> tuple[float, bool]:
        """When ``work`` must stop, and whether the execution limit decided it
        (`batch.stop_time`), counted from when it was first sent in this `run`.

        The server stops its SQL then (statement_timeout), so that the caller,
        still waiting, is told `Interrupted` (rolled back), not `Timeout`.
        """
        started = self._started.setdefault(_key(work), time.monotonic())
        return stop_time(work, started, self._execution_limit)

    def _interrupted(self, work: Work) -> Interrupted:
        """The error of ``work`` stopped at its stop time, worded by what stopped it."""
        ran = time.monotonic() - self._started[_key(work)]
        return interrupted(ran, self._stop_time(work)[1])

    # -- one request ------------------------------------------------------------------

    def _queue(self, conn: psycopg.Connection[Any], work: Work) -> Finish:
        """Send ``work``'s statements; return what computes its value once results are in.

        What the request changed with SET LOCAL is put back after its last
        statement (`LocalSettings`); if it fails, its savepoint's rollback
        (or the chunk's) undoes it.
        """
        settings = LocalSettings(conn)
        finish = self._send(conn, work, settings)
        settings.restore()
        return finish

    def _send(self, conn: psycopg.Connection[Any], work: Work, settings: LocalSettings) -> Finish:
        kind = work.request.kind
        body = work.body
        if kind == Kind.EXECUTE or kind == Kind.POST:
            cursor = conn.cursor()
            settings.before(body[0])
            _execute(cursor, body[0], body[1])
            return lambda: _written(cursor)
        if kind == Kind.EXECUTEMANY:
            cursor = conn.cursor()
            settings.before(body[0])
            _executemany(cursor, body[0], body[1])
            return lambda: (cursor.rowcount, None, [])
        if kind == Kind.SCRIPT:
            for statement in split_statements(body[0]):
                _refuse_control(statement)
                settings.before(statement)
                conn.cursor().execute(statement)
            return lambda: None
        if kind == Kind.TRANSACTION:
            parts: list[Finish] = []
            for many, sql, params in body[0]:
                cursor = conn.cursor()
                settings.before(sql)
                if many:
                    _executemany(cursor, sql, params)
                    parts.append(functools.partial(_rowcount, cursor))
                else:
                    _execute(cursor, sql, params)
                    parts.append(functools.partial(_written, cursor))
            return lambda: [part() for part in parts]
        if kind == Kind.CALL:
            value = self._run_call(conn, work, settings)
            return lambda: value
        raise ValueError(f"unknown request kind {kind}")

    def _run_call(self, conn: psycopg.Connection[Any], work: Work, settings: LocalSettings) -> Any:
        """Run a call() function, stopped if it overruns; return its value.

        Its SQL is stopped by the server (``statement_timeout``, set at the
        same stop time); its Python by a `CallLimiter` a moment later
        (`_PYTHON_GRACE`, less where the deadline comes sooner), so that an
        overrunning statement ends as the server's clean cancellation, not as
        an exception raised in the middle of psycopg's own code. Raises
        `Interrupted` if the function ran past its stop time (even if it
        caught the interruption), `RemoteError` for a BaseException that is
        not an Exception (SystemExit, KeyboardInterrupt, GeneratorExit...), or
        the function's own exception; the savepoint around it then rolls it
        back, and the writer serves on. Signal handling it changed is put back.
        """
        function: Callable[..., Any] = work.body[0]
        stop_at, by_limit = self._stop_time(work)
        # The Python's stop comes after the SQL's, and before the deadline
        # while the caller still waits.
        python_stop = stop_at + min(_PYTHON_GRACE, max(0.0, work.deadline - stop_at) / 2)
        if by_limit:
            python_stop = stop_at + _PYTHON_GRACE
        limiter = self._limiter
        if limiter is None:
            limiter = self._limiter = CallLimiter(None)
        # For the owner's watchdog: a function that swallows every
        # interruption is ended with the writer, its grace after this.
        self._state.busy_until = python_stop
        try:
            return limiter.run(
                python_stop,
                lambda: function(Connection(conn, settings), *work.body[1], **work.body[2]),
                lambda: restore_signals(self._signal_mask),
            )
        except CallOverrun as overrun:
            raise self._interrupted(work) from overrun

    def _fail(self, work: Work, exc: BaseException) -> bytes:
        """``work``'s error reply; counted when the `run` that answers it ends."""
        return self._failures.fail(work, sendable(exc))


def _millis(stop_at: float) -> int:
    """The statement_timeout that stops SQL at ``stop_at`` (at least 1 ms: 0 is none)."""
    return max(1, int((stop_at - time.monotonic()) * 1000))


def _ok(work: Work, value: Value) -> bytes:
    return ok_reply(work.request.request_id, work.request.kind, value)


def _run_end(chunk: list[Work], start: int) -> int:
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


def _queue_run(conn: psycopg.Connection[Any], run: list[Work]) -> list[Finish]:
    """Send a run (`_run_end`) as one pipelined executemany; return each request's finisher.

    One psycopg call for the run, where a cursor and an execute per request
    cost half as much again per statement (measured: 28 against 46 us of CPU
    per single-row insert, batches of 16). ``returning=True`` keeps a result
    per statement: its own rowcount and rows. The finishers must be called
    in the run's order: each reads its statement's result and moves on to
    the next.
    """
    text, _ = _prepare(run[0].body[0], run[0].body[1])
    cursor = conn.cursor()
    cursor.executemany(text, [work.body[1] for work in run], returning=True)

    def finish() -> Value:
        value = _written(cursor)
        cursor.nextset()
        return value

    return [finish] * len(run)


def _connection_failed(exc: psycopg.Error) -> bool:
    """Whether ``exc`` is the connection's failure, not a statement's.

    Every error the server reports for a statement carries a SQLSTATE; an
    OperationalError without one comes from the client side of the
    connection (libpq or psycopg: a socket that failed before libpq marked
    it closed, a pipeline left in a state it cannot go on from). No request
    caused it, so none is answered with it: the connection is dropped and
    the requests replayed on a new one, or told it is unavailable.
    """
    return isinstance(exc, psycopg.OperationalError) and not exc.sqlstate


def _lock_timed_out(exc: psycopg.Error) -> bool:
    """Whether ``exc`` is a lock wait stopped by lock_timeout, not a NOWAIT that failed.

    Both are SQLSTATE 55P03; the server raises the timeout from its interrupt
    handler, and reports that function's name, which no locale translates.
    """
    return exc.sqlstate == _LOCK_NOT_AVAILABLE and exc.diag.source_function == "ProcessInterrupts"


def _key(work: Work) -> tuple[int, int]:
    return (work.request.sender, work.request.request_id)


def _session_baseline(
    conn: psycopg.Connection[Any],
) -> tuple[psql.Composed, list[psql.SQL | psql.Composed]]:
    """What `PostgresEngine._commit` sends around COMMIT, read once ``init`` has run.

    The SET LOCAL that gives every COMMIT the session's synchronous_commit,
    and the statements that put every session value back as the connection
    and ``init`` left it: RESET SESSION AUTHORIZATION (which resets the role
    too; RESET ALL leaves both), RESET ALL, then ``init``'s own session values.
    """
    row = conn.execute("SHOW synchronous_commit").fetchone()
    assert row is not None
    durable = psql.SQL("SET LOCAL synchronous_commit = {}").format(psql.Literal(row[0]))
    reset: list[psql.SQL | psql.Composed] = [
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


def _check_transaction_open(conn: psycopg.Connection[Any]) -> None:
    """Raise `_Lost` if a `call()` function ended the writer's transaction.

    The wrapper refuses transaction control, but ``conn.native`` can send a
    COMMIT or ROLLBACK: what ran before it may or may not be committed, and
    the requests after it would autocommit one by one.
    """
    if not conn.broken and conn.info.transaction_status == TransactionStatus.IDLE:
        refused = StatementRefused(
            "a call() function ended the writer's transaction (a COMMIT or ROLLBACK"
            " through conn.native); this batch's outcome is unknown"
        )
        raise _Lost(refused, commit_sent=True)


def _roll_back_open_transaction(conn: psycopg.Connection[Any]) -> None:
    if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
        conn.execute("ROLLBACK")


def open_postgres_engine(
    dsn: str,
    init: str | Callable[[Any], object] | None,
    counters: Counters,
    state: Any,
    isolation: str = "read committed",
    execution_limit: float | None = None,
    migrations: Sequence[str | Callable[[Any], object]] = (),
) -> PostgresEngine:
    """Connect (in the writer process), run ``init`` and apply ``migrations``.

    Raises `ServerUnavailable` if the server cannot be reached or refuses the
    connection, psycopg's error if ``init`` fails, `MigrationFailed` if a
    migration does.
    """
    engine = PostgresEngine(dsn, init, counters, state, isolation, execution_limit)
    try:
        assert engine._conn is not None  # connected by __init__, or it raised
        apply_migrations(engine._conn, migrations, split_statements)
    except BaseException:
        engine.close()
        raise
    return engine
