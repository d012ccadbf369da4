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
              (a run of one SQL text: one executemany, `pg_requests.queue_run`)
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
RESETs sent with every COMMIT (`pg_session.commit`).

A statement waits on a lock at most `LOCK_SLICE` (lock_timeout): a request
that waits longer on a lock held outside the writer is rolled back to its
savepoint and held, unanswered, while the others commit; the loop serves it
again with the next batch, until it gets the lock or its deadline.

This module keeps the batch: its chunks, paths, retries and replies. Beside
it: `pg_session` (connecting, and the session put back with every COMMIT),
`pg_requests` (one request's statements; the `Connection` of a call()),
`pg_limits` (stop times, lock waits, the call() limiter), `pg_errors` (what
an error means for the transaction) and `pg_sql` (the lexer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql as psql

from .._errors import Interrupted, ServerUnavailable
from .._wire.frames import Kind, Request
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
    ok_reply,
    out_of_time,
)
from .migrations import apply_postgres as apply_migrations
from .pg_errors import (
    NOT_IN_TRANSACTION,
    QUERY_CANCELED,
    RETRYABLE,
    CommitFailed,
    Lost,
    Retryable,
    StatementFailed,
    check_transaction_open,
    classify,
    connection_failed,
    lock_timed_out,
    lost_error,
)
from .pg_errors import sendable as sendable
from .pg_limits import LOCK_SLICE, RequestLimits, key, may_hold, millis, time_limits
from .pg_requests import (
    RUN_MIN,
    Finish,
    LocalSettings,
    Value,
    execute,
    queue_run,
    run_end,
    send,
    written,
)
from .pg_session import Reset, commit, connect, roll_back_open_transaction
from .pg_sql import split_statements

log = logging.getLogger("mpwriter")

# PostgreSQL keeps 64 subtransactions per transaction in its cache (PGPROC_MAX_CACHED_SUBXIDS).
MAX_CHUNK = 64
# A statement's lock wait once that budget is spent: time enough for a lock
# that another writer's COMMIT is about to release.
_LOCK_WAIT_MIN = 0.005
_ALONE = SINGLE_STATEMENT
_MAX_RETRIES = 4
_BACKOFF_FIRST = 0.005
_BACKOFF_MAX = 0.5
_CONNECT_BACKOFF_MAX = 1.0
ISOLATION_LEVELS = {"read committed": "READ COMMITTED", "serializable": "SERIALIZABLE",
                    "repeatable read": "REPEATABLE READ"}  # fmt: skip


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
        self._init = init
        self._counters = counters
        self._state = state
        self.commit_seconds = 0.0
        self._begin = f"BEGIN ISOLATION LEVEL {ISOLATION_LEVELS[isolation]}"
        self._conn: psycopg.Connection[Any] | None = None
        # Sent with every COMMIT (see `_connect`): the session's durability
        # for the COMMIT, and what puts the session back as `init` left it.
        self._durable: psql.Composed = psql.Composed([])
        self._reset: Reset = []
        # Requests set aside after waiting LOCK_SLICE on a lock; tried again
        # in a later batch (the loop serves again what `run` left unanswered).
        self._held: set[tuple[int, int]] = set()
        # Error replies answered but not yet counted: they are once they stand.
        self._failures = Failures(counters)
        self._limits = RequestLimits(state, execution_limit)
        # Requests the last `run` deferred: they cannot run in a transaction.
        self._deferred: list[Work] = []
        self._connect(connect_timeout=10)

    # -- the connection -----------------------------------------------------------

    def _connect(self, connect_timeout: int) -> None:
        """Open the connection and run ``init``; raises what `pg_session.connect` says."""
        self._conn, self._durable, self._reset = connect(self._dsn, self._init, connect_timeout)

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
            held.intersection_update(key(work) for work in batch)
            # Counted when it first came.
            count_batch(self._counters, [work for work in batch if key(work) not in held])
        else:
            count_batch(self._counters, batch)
        self._failures.clear()  # a `run` that raised left its own: they did not stand
        self._limits.started.clear()
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
        self._limits.started[key(work)] = time.monotonic()  # a unit of its own
        try:
            timeout = psql.Literal(millis(self._limits.stop_time(work)[0]))
            conn.execute(psql.SQL("SET statement_timeout = {}").format(timeout))
            try:
                cursor = conn.cursor()
                execute(cursor, work.body[0], work.body[1])
                return _ok(work, written(cursor))
            finally:
                if not conn.broken:
                    conn.execute("RESET statement_timeout")
        except psycopg.Error as exc:
            if exc.sqlstate == QUERY_CANCELED:
                return self._fail(work, self._limits.interrupted(work))
            return self._fail(work, exc)
        except Exception as exc:
            return self._fail(work, exc)

    def tidy(self, idle: bool) -> None:
        """No upkeep between batches: the server checkpoints and vacuums by itself."""

    def abandon_transaction(self) -> None:
        if self._conn is not None:
            roll_back_open_transaction(self._conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            roll_back_open_transaction(conn)
        except psycopg.Error:
            log.exception("mpwriter: rolling back at close failed")
        finally:
            conn.close()

    # -- one chunk ------------------------------------------------------------------

    def _pipelinable(self, chunk: list[Work]) -> bool:
        """Whether ``chunk`` may try the pipelined path: no call(), no held request."""
        held = self._held
        return not any(
            work.request.kind == Kind.CALL or (held and key(work) in held) for work in chunk
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
            except Lost as lost:
                self._drop_connection()
                attempts += 1
                if lost.commit_sent or attempts > _MAX_RETRIES:
                    self._answer_lost(chunk, replies, lost)
                    return
                # Nothing was applied: reconnect (within the deadlines) and replay.
                log.warning("mpwriter: lost the PostgreSQL connection before COMMIT: %s", lost)
            except Retryable as retry:
                self._rollback()
                attempts += 1
                if attempts > _MAX_RETRIES:
                    self._one_by_one(chunk, replies, retry.error)
                    return
                self._counters.retries += 1
                self._backoff(attempts, chunk)
            except StatementFailed:
                self._rollback()
                self._counters.replayed_batches += 1
                if len(chunk) > MAX_CHUNK:
                    # The isolated path's savepoints: at most MAX_CHUNK a
                    # transaction. Each part tries the pipelined path first.
                    for start in range(0, len(chunk), MAX_CHUNK):
                        self._run_chunk(chunk[start : start + MAX_CHUNK], replies)
                    return
                pipelined = False
            except CommitFailed as failed:
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

    def _answer_lost(self, chunk: list[Work], replies: dict[int, bytes], lost: Lost) -> None:
        log.warning("mpwriter: lost the PostgreSQL connection: %s", lost.error)
        error = lost_error(lost)
        for work in chunk:
            if id(work) not in replies:  # else answered with its own error, rolled back
                replies[id(work)] = self._fail(work, error)

    def _commit(self, conn: psycopg.Connection[Any]) -> None:
        """COMMIT and put the session back (`pg_session.commit`); count it and its cost."""
        started = time.monotonic()
        if not commit(conn, self._durable, self._reset):
            self._drop_connection()  # committed; a new session is clean
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
                stop_at = max(self._limits.stop_time(work)[0] for work in chunk)
                conn.execute(time_limits(stop_at, earliest))
                start = 0
                while start < len(chunk):
                    end = run_end(chunk, start)
                    if end - start >= RUN_MIN:
                        finishers += queue_run(conn, chunk[start:end])
                    else:
                        finishers += [self._queue(conn, work) for work in chunk[start:end]]
                    start = end
        except psycopg.Error as exc:
            raise classify(self._conn, exc, commit_sent=False) from exc
        except Exception as exc:  # refused statement, unpicklable params...
            raise StatementFailed from exc
        encoded: list[bytes] = []
        try:
            for work, finish in zip(chunk, finishers, strict=True):
                encoded.append(_ok(work, finish()))
        except Exception as exc:
            raise StatementFailed from exc
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
                check_transaction_open(conn)
                self._state.busy_until = work.deadline
                lock_until = max(locks_until, time.monotonic() + _LOCK_WAIT_MIN)
                stop_at = self._limits.stop_time(work)[0]
                conn.execute(time_limits(stop_at, min(work.deadline, lock_until)))
                try:
                    with conn.transaction(savepoint_name="mpwriter_request"):
                        succeeded[id(work)] = _ok(work, self._queue(conn, work)())
                except psycopg.Error as exc:
                    if conn.broken or exc.sqlstate in RETRYABLE or connection_failed(exc):
                        raise
                    if exc.sqlstate == NOT_IN_TRANSACTION and work.request.kind in _ALONE:
                        alone.append(work)  # VACUUM and the like: after the batch
                        continue
                    error: BaseException = exc
                    if lock_timed_out(exc):
                        if may_hold(work):
                            held.append(work)
                            continue
                        error = Interrupted(
                            f"waited on a lock held by another transaction until its deadline"
                            f" ({exc}); rolled back, not applied"
                        )
                    elif exc.sqlstate == QUERY_CANCELED:
                        error = self._limits.interrupted(work)
                    failed.append((work, error))
                except Exception as exc:  # refused, unpicklable result, the function's own
                    failed.append((work, exc))
        except psycopg.Error as exc:
            # Nothing of this attempt was committed: the replay (or the
            # "not applied" answer) replaces every reply computed here.
            raise classify(self._conn, exc, commit_sent=False, replayable=False) from exc
        check_transaction_open(conn)
        self._commit(conn)
        for work, error in failed:
            replies[id(work)] = self._fail(work, error)
        replies.update(succeeded)
        self._deferred.extend(alone)
        for work in held:
            # No reply: the loop serves it again in a later batch, where it
            # runs on the isolated path at once.
            self._held.add(key(work))
        for work in chunk:
            if id(work) in replies:
                self._held.discard(key(work))

    # -- one request ------------------------------------------------------------------

    def _queue(self, conn: psycopg.Connection[Any], work: Work) -> Finish:
        """Send ``work``'s statements; return what computes its value once results are in.

        What the request changed with SET LOCAL is put back after its last
        statement (`LocalSettings`); if it fails, its savepoint's rollback
        (or the chunk's) undoes it.
        """
        settings = LocalSettings(conn)
        finish = send(conn, work, settings)
        if finish is None:  # a call(): run here, under its time limit
            value = self._limits.run_call(conn, work, settings)
            finish = lambda: value  # noqa: E731
        settings.restore()
        return finish

    def _fail(self, work: Work, exc: BaseException) -> bytes:
        """``work``'s error reply; counted when the `run` that answers it ends."""
        return self._failures.fail(work, sendable(exc))


def _ok(work: Work, value: Value) -> bytes:
    return ok_reply(work.request.request_id, work.request.kind, value)


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
