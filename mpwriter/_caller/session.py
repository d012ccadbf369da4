"""Interactive transactions: `Session`, made by `Writer.session()`.

A session sends its statements one at a time, each answered at once (reads
included), inside one transaction of the writer's, then commits or rolls
back. The writer serves one session at a time and holds everyone else's
requests meanwhile (see `mpwriter._writer.session`), so a session is bounded:
an idle limit between statements and a total limit, past which the writer
rolls it back and the next call raises `SessionExpired`.

The protocol of one session request (`Session._exchange`) is that of
`calls.request`, with two differences:

- the transaction holds one reply slot from its first statement to its
  commit or rollback: the writer watches that pipe, and rolls the
  transaction back at once when its reader is gone (the caller was killed,
  or retired the slot after a timeout);
- EOF on the pipe (the writer died) once the writer has answered one of the
  transaction's statements OK is not followed by a re-registration: the
  transaction died with that writer, and the caller is told so at once.
  Before that, nothing of it was applied, and the request waits for the next
  writer on a new pipe, as any request does.

Each request names its transaction (an id unique in this process) and says
whether it may open it (``first``: until the writer has answered one of its
statements OK). The writer answers a request for a transaction it rolled
back on its own with `SessionExpired`, and one it never heard of and may not
open (a new writer after a crash) with `WriterCrashed`.
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
import time
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from .._errors import (
    Error,
    NotPicklable,
    NotSupportedError,
    QueueFull,
    SessionExpired,
    WriterClosed,
    WriterCrashed,
    WriterUnavailable,
)
from .._wire.frames import (
    MAX_PAYLOAD,
    PICKLE_PROTOCOL,
    WHOLE,
    Kind,
    SessionOp,
    encode_frame,
)
from .._wire.replies import Result, as_result, unpack_reply
from .._wire.state import CLOSED, RUNNING
from . import aio, blocking, calls
from .pipe_pool import PipePool, Slot

# The writer rolls a session back after this long without a statement, or
# this long after it began: while one is open, every other request waits.
DEFAULT_IDLE_LIMIT = 5.0
DEFAULT_TOTAL_LIMIT = 30.0

_transaction_ids = itertools.count(1)


class Session:
    """An interactive transaction on the writer; see `Writer.session()`.

    Like a `sqlite3.Connection` in manual-commit mode: the first statement
    opens a transaction, `commit` or `rollback` ends it, and the next
    statement opens another. Used by one thread at a time.
    """

    def __init__(
        self,
        pool: PipePool,
        request_fd: int,
        timeout: float,
        idle_limit: float,
        total_limit: float,
    ) -> None:
        # NaN and infinity are refused here, before anything is sent: the
        # writer holds every other caller for as long as a session lasts.
        if not (0 < idle_limit < math.inf and 0 < total_limit < math.inf):
            raise ValueError(
                "a session's idle_limit and total_limit must be finite positive numbers"
                f" of seconds, not {idle_limit!r} and {total_limit!r}"
            )
        self._pool = pool
        self._request_fd = request_fd
        self.timeout = timeout
        self.idle_limit = idle_limit
        self.total_limit = total_limit
        # Read when a transaction opens (its first statement): False runs that
        # transaction with SQLite's foreign key enforcement off (see Writer.session).
        self.foreign_keys = True
        self._txn: int | None = None  # the open transaction's id
        self._confirmed = False  # the writer answered one of its statements OK
        # The slot the open transaction holds (one at most), in a list that
        # the finalizer shares: a session dropped mid-transaction retires it,
        # which tells the writer to roll the transaction back at once.
        self._held: list[Slot] = []
        self._pid = os.getpid()
        # The pool's per-process state, replaced in a forked child (see
        # `pipe_pool`): a check by identity, where os.getpid() is a system
        # call on every statement.
        self._process_state = pool.local
        self._closed = False
        abandon = weakref.finalize(self, _abandon, pool, self._held, self._pid)
        abandon.atexit = False  # at exit the process's descriptors close anyway

    def __repr__(self) -> str:
        state = "closed" if self._closed else "in transaction" if self._txn else "idle"
        return f"<mpwriter.Session {state}>"

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (a statement was sent since the last end)."""
        return self._txn is not None

    # -- blocking ---------------------------------------------------------------

    def execute(self, sql: str, params: Any = (), *, timeout: float | None = None) -> Result:
        """Run one statement in the session's transaction; its rows come back at once.

        Opens the transaction if none is open. An SQL error is raised as its
        driver class and undoes that statement only: the transaction stays
        open. Raises `SessionExpired` if the writer rolled the transaction
        back (a limit passed), `WriterCrashed` if the writer died (the
        transaction was rolled back), `StatementRefused` for BEGIN, COMMIT,
        END or ROLLBACK sent as SQL.
        """
        return as_result(blocking.run(self._step(SessionOp.EXECUTE, (sql, params), timeout)))

    def executemany(
        self, sql: str, seq_of_params: Iterable[Any], *, timeout: float | None = None
    ) -> Result:
        """`execute` once per parameter set, as one statement of the session."""
        body = (sql, list(seq_of_params))
        return as_result(blocking.run(self._step(SessionOp.EXECUTEMANY, body, timeout)))

    def executescript(self, script: str, *, timeout: float | None = None) -> None:
        """Run several statements; stops at the first that fails (which is raised)."""
        blocking.run(self._step(SessionOp.SCRIPT, (script,), timeout))

    def commit(self, *, timeout: float | None = None) -> None:
        """Commit the open transaction; return once that COMMIT is durable.

        The writer commits it together with the requests that waited for the
        session (one group commit). Nothing to do without a transaction.
        Raises `SessionExpired` if the transaction was rolled back instead
        (nothing of it applied), `Timeout` or `WriterCrashed` if the outcome
        is unknown.
        """
        if self._txn is not None:
            blocking.run(self._step(SessionOp.COMMIT, (), timeout))

    def rollback(self, *, timeout: float | None = None) -> None:
        """Roll the open transaction back; nothing to do without one."""
        if self._txn is not None:
            blocking.run(self._step(SessionOp.ROLLBACK, (), timeout))

    def close(self) -> None:
        """Roll back what is open; the session cannot be used after."""
        if self._closed:
            return
        try:
            if self._txn is not None and os.getpid() == self._pid:
                self.rollback()
        finally:
            self._closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit on a normal exit, roll back on an exception; then close."""
        try:
            if exc_type is None:
                self.commit()
            else:
                self.rollback()
        finally:
            self.close()

    # -- asyncio ------------------------------------------------------------------

    async def aexecute(self, sql: str, params: Any = (), *, timeout: float | None = None) -> Result:
        """`execute` for asyncio."""
        return as_result(await aio.run(self._step(SessionOp.EXECUTE, (sql, params), timeout)))

    async def aexecutemany(
        self, sql: str, seq_of_params: Iterable[Any], *, timeout: float | None = None
    ) -> Result:
        """`executemany` for asyncio."""
        body = (sql, list(seq_of_params))
        return as_result(await aio.run(self._step(SessionOp.EXECUTEMANY, body, timeout)))

    async def aexecutescript(self, script: str, *, timeout: float | None = None) -> None:
        """`executescript` for asyncio."""
        await aio.run(self._step(SessionOp.SCRIPT, (script,), timeout))

    async def acommit(self, *, timeout: float | None = None) -> None:
        """`commit` for asyncio."""
        if self._txn is not None:
            await aio.run(self._step(SessionOp.COMMIT, (), timeout))

    async def arollback(self, *, timeout: float | None = None) -> None:
        """`rollback` for asyncio."""
        if self._txn is not None:
            await aio.run(self._step(SessionOp.ROLLBACK, (), timeout))

    # -- the protocol -----------------------------------------------------------------

    def _step(self, op: SessionOp, args: tuple[Any, ...], timeout: float | None) -> calls.Step[Any]:
        """The protocol generator of one session request, for any driver to run."""
        if self._closed:
            raise Error("this session was closed")
        pool = self._pool
        if pool.local is not self._process_state:
            raise Error("a session cannot be used in a process forked from its own")
        if pool.closed or pool.state.status != RUNNING:
            if self._txn is not None:
                self._end()
                raise self._lost(rolled_back=op != SessionOp.COMMIT) from None
            raise pool.unavailable(sent=False)
        if self._txn is None:
            self._txn = next(_transaction_ids)
            self._confirmed = False
        now = time.monotonic()
        deadline = now + (self.timeout if timeout is None else timeout)
        body = (
            self._txn,
            not self._confirmed,
            int(op),
            args,
            self.idle_limit,
            self.total_limit,
            bool(self.foreign_keys),
        )
        try:
            payload = pickle.dumps((deadline, now, body), PICKLE_PROTOCOL)
        except Exception as exc:
            raise NotPicklable(f"cannot send this session statement to the writer: {exc}") from exc
        return self._exchange(op, payload, deadline)

    def _exchange(self, op: SessionOp, payload: bytes, deadline: float) -> calls.Step[Any]:
        pool = self._pool
        if self._held:
            slot = self._held[0]
        else:
            free = pool.local.free
            try:
                slot = free.pop()  # atomic: another thread may take the last pipe
            except IndexError:
                slot = yield from calls.new_slot(pool, deadline)
            self._held.append(slot)
        sent = False
        try:
            if len(payload) <= MAX_PAYLOAD:
                request_id = pool.next_request_id()
                frame = encode_frame(
                    Kind.SESSION,
                    WHOLE,
                    pool.local.sender,
                    request_id,
                    slot.number,
                    payload,
                    pool.frame_key,
                )
                yield from calls.write_frames(pool, self._request_fd, (frame,), deadline)
            else:
                request_id = yield from calls.send_bulk(
                    pool, self._request_fd, Kind.SESSION, payload, slot, deadline
                )
            sent = True
            reply = yield from calls.receive(
                self._pool, slot, request_id, deadline, on_eof=lambda: self._refuse_a_successor(op)
            )
        except BaseException as exc:
            if isinstance(exc, QueueFull) and not sent:
                raise  # not sent: nothing will come on the slot, the transaction goes on
            # A reply may still come on the slot: retired, which also tells
            # the writer (its reader is gone) to roll the transaction back.
            self._held.clear()
            self._txn = None
            pool.retire(slot)
            raise
        try:
            value = unpack_reply(reply)
        except (SessionExpired, WriterUnavailable, NotSupportedError):
            self._end()  # no transaction is open in the writer
            raise
        except BaseException:
            if op in (SessionOp.COMMIT, SessionOp.ROLLBACK):
                self._end()
            raise
        if op in (SessionOp.COMMIT, SessionOp.ROLLBACK):
            self._end()
        else:
            self._confirmed = True
        return value

    def _refuse_a_successor(self, op: SessionOp) -> None:
        """At EOF: a transaction the writer confirmed died with it (raise);
        one of which nothing was applied yet (a pooled slot whose writer died
        since, or a first statement that failed) waits, as any request, for
        the next writer on a new pipe."""
        if self._confirmed:
            raise self._lost(rolled_back=op != SessionOp.COMMIT) from None

    def _lost(self, *, rolled_back: bool) -> WriterUnavailable:
        """The error for a transaction whose writer is gone (closed or dead)."""
        outcome = (
            "the session's transaction was rolled back, not committed"
            if rolled_back
            else "the outcome of this commit is unknown"
        )
        if self._pool.closed or self._pool.state.status == CLOSED:
            return WriterClosed(f"the writer was closed; {outcome}")
        return WriterCrashed(f"the writer process died; {outcome}")

    def _end(self) -> None:
        """The transaction is over: its slot, clean, goes back to the pool."""
        self._txn = None
        if self._held:
            self._pool.local.free.append(self._held.pop())


def _abandon(pool: PipePool, held: list[Slot], pid: int) -> None:
    """A session collected with its transaction open: retire its slot (see `Session`)."""
    if held and os.getpid() == pid and not pool.closed:
        pool.retire(held.pop())
