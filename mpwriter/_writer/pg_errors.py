"""What a PostgreSQL error means for the engine's transaction (`postgres.py`).

A psycopg error raised while a chunk runs is turned into one of the control
exceptions below by `classify`; the engine's retry loop (`_run_chunk`)
decides by its class: `Lost` (reconnect and replay, or answer "not applied"
or "outcome unknown" by whether COMMIT was sent), `Retryable` (roll back,
back off, replay), `StatementFailed` (replay on the isolated path, one
savepoint a request) and `CommitFailed` (replay one request a transaction).
Also here: the errors' way back to the caller (`sendable`).
"""

from __future__ import annotations

import pickle
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from .._errors import OutcomeUnknown, ServerUnavailable, StatementRefused

RETRYABLE = frozenset({"40001", "40P01"})  # serialization failure, deadlock detected
QUERY_CANCELED = "57014"  # statement_timeout
_LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout (and NOWAIT)
# "cannot run inside a transaction block" (VACUUM, CREATE INDEX CONCURRENTLY...):
# a single statement so refused runs alone after the batch (`run_alone`).
NOT_IN_TRANSACTION = "25001"
_SHUTDOWN = frozenset({"57P01", "57P02", "57P03"})  # admin/crash shutdown, starting up


class Retryable(Exception):
    """A serialization failure or deadlock: roll back, back off, replay."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class StatementFailed(Exception):
    """A statement failed on the fast path: replay on the isolated path."""


class CommitFailed(Exception):
    """COMMIT (or a statement where no replay can help) failed: one request a transaction."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Lost(Exception):
    """The connection broke; ``commit_sent`` says whether COMMIT may have run."""

    def __init__(self, error: BaseException, commit_sent: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.commit_sent = commit_sent


def classify(
    conn: psycopg.Connection[Any] | None,
    exc: psycopg.Error,
    commit_sent: bool,
    *,
    replayable: bool = True,
) -> Exception:
    """The control-flow exception for an error of the engine's transaction on ``conn``.

    ``replayable``: whether a statement's failure may send the chunk to
    the isolated path; on that path it cannot help, so the chunk is split.
    """
    state = exc.sqlstate or ""
    # Class 08 (connection exception) and the server shutting down (57P01-3)
    # end the session even when libpq has not noticed the socket closing yet.
    if (
        conn is None
        or conn.broken
        or state.startswith("08")
        or state in _SHUTDOWN
        or connection_failed(exc)
    ):
        return Lost(exc, commit_sent)
    if state in RETRYABLE:
        return Retryable(exc)
    return StatementFailed() if replayable and not commit_sent else CommitFailed(exc)


def lost_error(lost: Lost) -> BaseException:
    """What a request of a chunk whose connection was lost is told."""
    if lost.commit_sent:
        return OutcomeUnknown(
            f"the connection to PostgreSQL was lost after COMMIT was sent ({lost.error});"
            " the outcome is unknown"
        )
    return ServerUnavailable(
        f"the connection to PostgreSQL was lost before COMMIT ({lost.error}); not applied"
    )


def connection_failed(exc: psycopg.Error) -> bool:
    """Whether ``exc`` is the connection's failure, not a statement's.

    Every error the server reports for a statement carries a SQLSTATE; an
    OperationalError without one comes from the client side of the
    connection (libpq or psycopg: a socket that failed before libpq marked
    it closed, a pipeline left in a state it cannot go on from). No request
    caused it, so none is answered with it: the connection is dropped and
    the requests replayed on a new one, or told it is unavailable.
    """
    return isinstance(exc, psycopg.OperationalError) and not exc.sqlstate


def lock_timed_out(exc: psycopg.Error) -> bool:
    """Whether ``exc`` is a lock wait stopped by lock_timeout, not a NOWAIT that failed.

    Both are SQLSTATE 55P03; the server raises the timeout from its interrupt
    handler, and reports that function's name, which no locale translates.
    """
    return exc.sqlstate == _LOCK_NOT_AVAILABLE and exc.diag.source_function == "ProcessInterrupts"


def check_transaction_open(conn: psycopg.Connection[Any]) -> None:
    """Raise `Lost` if a `call()` function ended the writer's transaction.

    The wrapper refuses transaction control, but ``conn.native`` can send a
    COMMIT or ROLLBACK: what ran before it may or may not be committed, and
    the requests after it would autocommit one by one.
    """
    if not conn.broken and conn.info.transaction_status == TransactionStatus.IDLE:
        refused = StatementRefused(
            "a call() function ended the writer's transaction (a COMMIT or ROLLBACK"
            " through conn.native); this batch's outcome is unknown"
        )
        raise Lost(refused, commit_sent=True)


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
