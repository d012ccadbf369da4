"""How long a request may run on PostgreSQL, and what stops it.

The server stops a request's SQL at its stop time (statement_timeout, sent
with every request: `time_limits`), and its lock waits after `LOCK_SLICE`
(lock_timeout): a request that waits longer on a lock held outside the
writer is set aside and served again in a later batch (`may_hold`). A
`call()` function's Python is stopped a moment after its SQL, by a
`CallLimiter` (`RequestLimits.run_call`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql as psql

from .._errors import Interrupted
from .._wire.frames import Kind
from .batch import DEADLINE_MARGIN, Work, interrupted, out_of_time, stop_time
from .call_limit import CallLimiter, CallOverrun, own_signals, restore_signals
from .pg_requests import Connection, LocalSettings

# A call() function's Python is interrupted this long after its stop time,
# when the server's statement_timeout has stopped its SQL already (at most
# half the time left before its deadline: its caller must hear `Interrupted`).
_PYTHON_GRACE = 0.1
# The longest a statement of a shared transaction waits on a lock held outside
# the writer before its request is set aside and tried again in a later batch:
# while it waits, the writer's one connection serves nobody else. It is also
# what all the lock waits of one isolated pass may take together, so that a
# table lock held outside costs a batch LOCK_SLICE, not LOCK_SLICE a request.
LOCK_SLICE = 0.1


class RequestLimits:
    """The stop times of the requests of one `run`, and the limiter of call() functions."""

    def __init__(self, state: Any, execution_limit: float | None) -> None:
        self._state = state
        self._execution_limit = execution_limit
        # When each request of the current `run` was first sent: its stop
        # time (`batch.stop_time`) counts from there, replays included.
        self.started: dict[tuple[int, int], float] = {}
        # call() functions run under a `CallLimiter`, started at the first.
        self._signal_mask = own_signals()
        self._limiter: CallLimiter | None = None

    def stop_time(self, work: Work) -> tuple[float, bool]:
        """When ``work`` must stop, and whether the execution limit decided it
        (`batch.stop_time`), counted from when it was first sent in this `run`.

        The server stops its SQL then (statement_timeout), so that the caller,
        still waiting, is told `Interrupted` (rolled back), not `Timeout`.
        """
        started = self.started.setdefault(key(work), time.monotonic())
        return stop_time(work, started, self._execution_limit)

    def interrupted(self, work: Work) -> Interrupted:
        """The error of ``work`` stopped at its stop time, worded by what stopped it."""
        ran = time.monotonic() - self.started[key(work)]
        return interrupted(ran, self.stop_time(work)[1])

    def run_call(self, conn: psycopg.Connection[Any], work: Work, settings: LocalSettings) -> Any:
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
        stop_at, by_limit = self.stop_time(work)
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
            raise self.interrupted(work) from overrun


def time_limits(stop_at: float, lock_deadline: float) -> psql.Composed:
    """SET LOCAL statement_timeout and lock_timeout, in one statement.

    statement_timeout: the server stops SQL that runs past ``stop_at``
    (`RequestLimits.stop_time`). lock_timeout: a statement's wait on a lock
    ends at ``lock_deadline`` or after `LOCK_SLICE`, whichever comes
    first: a request that waits longer on a lock held outside the writer
    is set aside (`may_hold`) and tried again after the others' replies,
    rather than holding them.
    """
    now = time.monotonic()
    lock_end = min(lock_deadline - DEADLINE_MARGIN, now + LOCK_SLICE)
    lock_millis = max(1, int((lock_end - now) * 1000))
    return psql.SQL(
        "SELECT set_config('statement_timeout', {}, true), set_config('lock_timeout', {}, true)"
    ).format(psql.Literal(str(millis(stop_at))), psql.Literal(str(lock_millis)))


def may_hold(work: Work) -> bool:
    """Whether ``work``, stopped by its lock_timeout, may be tried again in a later batch.

    Not past its deadline; and not a streamed executemany, whose rows the
    loop releases once the batch is answered.
    """
    if out_of_time(work, time.monotonic()):
        return False
    return work.request.kind != Kind.EXECUTEMANY or isinstance(work.body[1], list | tuple)


def millis(stop_at: float) -> int:
    """The statement_timeout that stops SQL at ``stop_at`` (at least 1 ms: 0 is none)."""
    return max(1, int((stop_at - time.monotonic()) * 1000))


def key(work: Work) -> tuple[int, int]:
    """What names ``work`` across the batches that serve it: (sender, request id)."""
    return (work.request.sender, work.request.request_id)
