"""The SQLite engine: group commit on the writer's one SQLite connection.

It owns what is SQLite's: the single-writer lock file, opening the database
(`sqlite_connection.py`: WAL, the chosen durability, foreign keys), running
each caller's request vetted and bounded (`sqlite_guard.py`: the authorizer,
the progress handler, the guards around call() functions), waiting out
outside lock holders (busy backoff), WAL checkpoints between batches
(`sqlite_checkpoint.py`, never inside a COMMIT), and the checkpoint at close.
The loop (`loop.py`) sees it only through `engine.Engine`; an interactive
session (`session.py`) through the methods under "for sessions".

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

The writer's own transaction statements are the only ones allowed: the
guard's authorizer refuses BEGIN, COMMIT, END, ROLLBACK, SAVEPOINT and
RELEASE from callers (SQLite tells us what a statement does; we do not guess
from its text). Statements that SQLite will not run inside a transaction
(VACUUM, changing foreign_keys) are deferred: the batch commits and its
replies go out, then each runs alone (`run_alone`), with its own deadline
published for the watchdog. Settings the writer depends on (WAL, normal
locking, its durability, its own lock waits) are refused with
`StatementRefused`.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .. import testing
from .._errors import StatementRefused
from .._wire.frames import Request, Status, encode_reply
from . import forks
from .batch import (
    SINGLE_STATEMENT,
    Counters,
    Failures,
    Work,
    back_off,
    commit_cost,
    count_batch,
    count_failure,
    error_reply,
    expired,
    out_of_time,
    stop_time,
)
from .claim import Claim
from .migrations import apply_sqlite as apply_migrations
from .sqlite_checkpoint import (
    BACKSTOP_CHECKPOINT_FRAMES,
    IDLE_CHECKPOINT_FRAMES,
    Checkpoints,
)
from .sqlite_connection import (
    BEGIN,
    COMMIT,
    RELEASE,
    ROLLBACK,
    ROLLBACK_TO,
    SAVEPOINT,
    SOLO_SUFFIX,
    WriterConnection,
    is_busy,
    open_database,
    split_script,
)
from .sqlite_guard import Guard, NeedsSolo, Refused

# The checkpoint thresholds are re-exported: part of what this engine promises.
__all__ = [
    "BACKSTOP_CHECKPOINT_FRAMES",
    "IDLE_CHECKPOINT_FRAMES",
    "SqliteEngine",
    "deferred_violation",
    "open_sqlite_engine",
]

# SQLite's lock waits are short (another process's transaction): the first
# retry comes soon, and none waits longer than this.
_BACKOFF_FIRST = 0.001
_BACKOFF_MAX = 0.1

log = logging.getLogger("mpwriter")

# A batch's replies as the engine gathers them: by ``id(work)``, each the
# request and its reply, so that the loop's list is the values, in order of
# answering, with no lookup per request.
Replies = dict[int, tuple[Request, bytes]]


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


class _FaultyControl:
    """The writer's control cursor under the ``writer_statement`` fault
    (`mpwriter.testing`): the hook sees each statement first, and may raise."""

    def __init__(self, cursor: sqlite3.Cursor, hook: Callable[[str], None]) -> None:
        self._cursor = cursor
        self._hook = hook

    def execute(self, sql: str) -> sqlite3.Cursor:
        self._hook(sql)
        return self._cursor.execute(sql)


def _control_cursor(conn: WriterConnection) -> sqlite3.Cursor | _FaultyControl:
    """The cursor the writer's own transaction statements run on (BEGIN,
    SAVEPOINT, RELEASE, COMMIT), wrapped when the ``writer_statement`` fault is on."""
    # A cursor of their own: conn.execute makes a new cursor each time (a
    # call() costs two of them).
    cursor = conn.cursor()
    hook = testing.faults.writer_statement
    return cursor if hook is None else _FaultyControl(cursor, hook)


def _not_applied(exc: Exception) -> Exception:
    """``exc``, for a request it kept from committing: its class, saying so."""
    message = f"{exc} (the writer's own statement failed); rolled back, not applied"
    try:
        told = type(exc)(message)
    except Exception:  # a class that takes other arguments: the generic one
        told = sqlite3.OperationalError(message)
    for name in ("sqlite_errorcode", "sqlite_errorname"):  # Python 3.11+
        if hasattr(exc, name):
            setattr(told, name, getattr(exc, name))
    return told


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
        self._guard = Guard(conn, state, execution_limit)
        self._control = _control_cursor(conn)
        self._counters = counters
        self._state = state
        self._execution_limit = execution_limit
        # True while the open transaction holds an interactive session's
        # committed work, waiting for the next batch's COMMIT (`session.py`).
        self.carrying_session = False
        # Requests deferred by the last `run`, each to run alone (`run_alone`).
        self._deferred: list[tuple[Work, BaseException]] = []
        # Failures answered but not yet counted: they are once they stand.
        self._failures = Failures(counters)
        self._checkpoints = Checkpoints(conn)
        forks.in_forked_child(self._refuse_in_child)
        self.commit_seconds = 0.0

    def _refuse_in_child(self) -> None:
        """In a child forked by a call() function: its copy of the connection
        refuses every statement, and the -shm descriptor is let go (`forks`)."""
        if self._checkpoints.wal_index is not None:
            forks.blank([self._checkpoints.wal_index])
        self._guard.refuse_all()

    def abandon_transaction(self) -> None:
        """Roll back whatever transaction is open, with the writer's own statement text."""
        if self._conn.in_transaction:
            self._conn.execute(ROLLBACK)

    # -- the batch ------------------------------------------------------------

    def run(self, batch: list[Work]) -> list[tuple[Request, bytes]]:
        """Run ``batch`` in one transaction; return the replies it has now.

        Replies are returned only once the transaction has committed (or
        failed); the caller sends them after this returns. A request that
        must run alone is left out and deferred to `run_alone`.
        """
        count_batch(self._counters, batch)
        self._failures.clear()  # a `run` that raised left its own: they did not stand
        replies: Replies = {}
        solo: list[tuple[Work, BaseException]] = []
        try:
            self._commit_what_can(batch, replies, solo)
        except Exception as exc:
            # Only the writer's own statements get here (a SAVEPOINT, RELEASE
            # or ROLLBACK TO on a failing disk), and attempts of this batch may
            # have committed already: their replies stand, the rest is failed.
            self._fail_the_rest(batch, replies, solo, exc)
        self.carrying_session = False
        self._failures.settle()
        self._state.busy_until = 0.0
        self._guard.repair_between_batches()
        self._deferred = solo
        return list(replies.values())  # (`Replies`: no lookup per request)

    def _commit_what_can(
        self, batch: list[Work], replies: Replies, solo: list[tuple[Work, BaseException]]
    ) -> None:
        """Run and commit ``batch``, replaying it without each culprit; fill ``replies``.

        A request that spoils the transaction (`_TransactionLost`) is
        answered with its error and the batch runs again without it. A
        COMMIT refused by a deferred constraint (`_CommitRefused`) has a
        culprit that no savepoint noticed: the batch is bisected -- its
        first half run and committed if it can be, else halved again --
        until the first request whose addition makes the COMMIT fail is
        alone; it is answered with the error, and the rest runs on (and is
        bisected again if another culprit is in it). The innocent requests
        commit, in their order. Nothing of this costs a batch that commits.
        (One loop over the attempts, longer than most: its state -- what is
        pending, the suspect prefix -- is what the bisection is.)
        """
        counters = self._counters
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
            recorded = self._failures.mark()
            attempt_solo: list[tuple[Work, BaseException]] = []
            try:
                outcome = self._run_in_transaction(attempt, attempt_solo)
            except _TransactionLost as lost:
                self.carrying_session = False  # its work is gone: session.py tells it
                self.abandon_transaction()
                self._failures.drop_since(recorded)  # this attempt's outcome does not stand
                counters.replayed_batches += 1
                culprit = attempt[lost.index]
                replies[id(culprit)] = self._failures.answer(culprit, lost.error)
                pending = [work for work in pending if work is not culprit]
                suspects = None
                continue
            except _CommitRefused as refused:
                self._failures.drop_since(recorded)
                if self.carrying_session:
                    # The refused COMMIT held a session's work too, which may be
                    # what it refused: the batch runs again without it first.
                    self.carrying_session = False
                    counters.replayed_batches += 1
                    continue
                if len(pending) > 1:
                    counters.replayed_batches += 1  # some of it runs again
                if size == 1:
                    replies[id(attempt[0])] = self._failures.answer(
                        attempt[0], refused.culprit_error()
                    )
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

    def _fail_the_rest(
        self,
        batch: list[Work],
        replies: Replies,
        solo: list[tuple[Work, BaseException]],
        exc: Exception,
    ) -> None:
        """After a writer's own statement raised ``exc`` in `_commit_what_can`:
        roll back the attempt it broke and answer every request of ``batch``
        not answered yet (nor deferred) with ``exc``'s class, saying "not applied".

        ``replies`` holds only what stands: the replies of committed attempts
        and of requests failed before them; the broken attempt's own failures
        did not stand, and are forgotten.
        """
        log.error("mpwriter: the writer's own statement failed: %s", exc, exc_info=exc)
        self._failures.keep_only(replies)
        try:
            self.abandon_transaction()
        except Exception:
            log.exception("mpwriter: rolling back the failed attempt failed too")
        deferred = {id(work) for work, _ in solo}
        failure = _not_applied(exc)
        for work in batch:
            if id(work) not in replies and id(work) not in deferred:
                replies[id(work)] = self._failures.answer(work, failure)

    def run_alone(self) -> Iterator[tuple[Request, bytes]]:
        """Run the requests the last `run` deferred, one at a time; yield each reply.

        Each is a unit of its own, after the batch's replies were sent: its
        own deadline (or execution limit) stops it and is published for the
        watchdog, and a long VACUUM holds back no other reply.
        """
        deferred, self._deferred = self._deferred, []
        for work, cause in deferred:
            reply = self._run_solo(work, cause)
            self._failures.settle()
            yield work.request, reply

    def _begin(self, batch: list[Work], replies: Replies) -> list[Work]:
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
                self._control.execute(BEGIN)
                return pending
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    for work in pending:
                        replies[id(work)] = self._failures.answer(work, exc)
                    return []
                busy = exc
            now = time.monotonic()
            still: list[Work] = []
            for work in pending:
                if out_of_time(work, now):
                    replies[id(work)] = self._failures.answer(work, busy)
                else:
                    still.append(work)
            pending = still
            if not pending:
                break
            self._counters.retries += 1
            back_off(pending, delay, now)
            delay = min(delay * 2, _BACKOFF_MAX)
        return []

    def _run_in_transaction(
        self, pending: list[Work], solo: list[tuple[Work, BaseException]]
    ) -> Replies:
        conn = self._conn
        control = self._control
        run = self._guard.run
        replies: Replies = {}
        failed: set[int] = set()  # ids of those failed: rare, where successes are not
        for index, work in enumerate(pending):
            # A single statement needs no savepoint: SQLite undoes a failed
            # statement by itself. Where it does not (OR FAIL keeps the rows
            # written before the failure, and an unencodable result must be
            # undone), the change count shows it and the batch is replayed.
            single = work.request.kind in SINGLE_STATEMENT
            if single:
                changes = conn.total_changes
            else:
                control.execute(SAVEPOINT)
            try:
                replies[id(work)] = (work.request, run(work))
            except NeedsSolo as needs:
                solo.append((work, needs.__cause__ or needs))
            except Refused as refused:
                replies[id(work)] = self._failures.answer(work, StatementRefused(refused.args[0]))
                failed.add(id(work))
            except Exception as exc:
                if not conn.in_transaction or (single and conn.total_changes != changes):
                    raise _TransactionLost(index, exc) from exc
                replies[id(work)] = self._failures.answer(work, exc)
                failed.add(id(work))
            else:
                if not single:
                    control.execute(RELEASE)
                continue
            if not single:
                control.execute(ROLLBACK_TO)
                control.execute(RELEASE)
        self._commit(pending, failed, replies)
        return replies

    def _commit(self, ran: list[Work], failed: set[int], replies: Replies) -> None:
        """COMMIT; if it fails, fail those of ``ran`` answered OK (rolled back
        now), or raise `_CommitRefused` for a deferred constraint (a culprit)."""
        started = time.monotonic()
        try:
            self._control.execute(COMMIT)
        except sqlite3.Error as exc:
            succeeded = [w for w in ran if id(w) in replies and id(w) not in failed]
            # A COMMIT refused by a deferred constraint leaves the transaction
            # open (SQLite's rule); any other failure is nobody's fault.
            deferred = exc if isinstance(exc, sqlite3.IntegrityError) else None
            if not self._conn.in_transaction:
                deferred = None
            self.abandon_transaction()
            if deferred is not None and succeeded:
                raise _CommitRefused(deferred) from exc
            for work in succeeded:
                replies[id(work)] = self._failures.answer(work, exc)
        else:
            self._counters.commits += 1
            self.commit_seconds = commit_cost(self.commit_seconds, started, time.monotonic())

    def _run_solo(self, work: Work, cause: BaseException) -> bytes:
        """Run a statement that SQLite will not run inside a transaction.

        Only a single statement qualifies (``execute``); it was vetted when it
        was first prepared inside the batch, so it runs unguarded here -- VACUUM
        issues its own BEGIN internally -- but held to its own stop time.
        """
        if work.request.kind not in SINGLE_STATEMENT:
            return self._failures.fail(work, cause)
        if testing.faults.solo_delay:
            self._state.busy_until = work.deadline
            time.sleep(testing.faults.solo_delay)  # sleep-ok: a fault: a long VACUUM
        started = time.monotonic()
        if work.deadline <= started:
            self._counters.expired += 1
            return self._failures.fail(work, expired())
        stop_at, _ = stop_time(work, started, self._execution_limit)
        self._state.busy_until = stop_at
        sql, params = work.body[0], work.body[1]
        try:
            # The suffix: this unvetted statement's cached form must not be
            # found by the same text sent later inside a batch.
            value = self._guard.run_alone(sql + SOLO_SUFFIX, params, stop_at)
            return encode_reply(work.request.request_id, Status.OK, value)
        except sqlite3.OperationalError as exc:
            if time.monotonic() > stop_at and "interrupted" in str(exc):
                return self._failures.fail(work, self._guard.stopped(started))
            return self._failures.fail(work, exc)
        except Exception as exc:
            return self._failures.fail(work, exc)
        finally:
            self._state.busy_until = 0.0

    # -- for sessions (`session.py`) -------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open on the writer's connection."""
        return self._conn.in_transaction

    def begin_session(self, work: Work) -> bytes | None:
        """Open the transaction an interactive session drives (`_begin`'s waits).

        Returns None once it is open, or ``work``'s error reply (counted) if
        an outside lock holder stayed past its deadline or BEGIN failed.
        """
        replies: Replies = {}
        opened = self._begin([work], replies)
        self._failures.settle()
        return None if opened else replies[id(work)][1]

    def run_session_statement(self, work: Work) -> bytes:
        """Run one statement of a session in the open transaction; its OK reply.

        Vetted as every caller's, except that the caller's own savepoints are
        allowed. Raises `Refused`, `NeedsSolo` or the statement's own error,
        which the session answers with `fail_now`: a session's statement is
        never replayed, so its failure stands at once.
        """
        guard = self._guard
        guard.session_savepoints = True
        try:
            return guard.run(work)
        finally:
            guard.session_savepoints = False
            self._state.busy_until = 0.0

    def fail_now(self, work: Work, exc: BaseException) -> bytes:
        """``work``'s error reply, counted now (its outcome stands)."""
        count_failure(self._counters, work, exc)
        return error_reply(work.request.request_id, exc)

    def commit_now(self) -> sqlite3.Error | None:
        """COMMIT the open transaction (a session's work) now, alone.

        Returns None once it committed (counted as a batch and a commit), or
        SQLite's error, the transaction rolled back.
        """
        started = time.monotonic()
        try:
            self._control.execute(COMMIT)
        except sqlite3.Error as exc:
            self.abandon_transaction()  # a refused COMMIT leaves it open
            return exc
        self._counters.batches += 1
        self._counters.commits += 1
        self.commit_seconds = commit_cost(self.commit_seconds, started, time.monotonic())
        return None

    def enforce_foreign_keys(self, on: bool) -> None:
        """Switch foreign key enforcement, outside any transaction (SQLite
        ignores the setting inside one)."""
        if on:
            self.abandon_transaction()  # nothing should be open; never leave it on inside one
        self._conn.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'} /* mpwriter */")

    # -- checkpoints -------------------------------------------------------------

    @property
    def checkpoints(self) -> int:
        """Checkpoints attempted by `tidy`."""
        return self._checkpoints.checkpoints

    def unchecked_frames(self) -> int:
        """WAL frames not yet copied back into the database (a hint, not a promise)."""
        return self._checkpoints.unchecked_frames()

    def tidy(self, idle: bool) -> None:
        """Checkpoint the WAL if it is due, between batches (`Checkpoints.tidy`)."""
        self._checkpoints.tidy(idle)

    def close(self) -> None:
        """Roll back what is open, checkpoint, close, release the lock; logs failures."""
        conn = self._conn
        self._checkpoints.close()
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
