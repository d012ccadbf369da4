"""The handle callers use: `Writer`, usable from any process that has it.

A call pickles its request here, in the caller (so a bad argument fails at
once, with nothing queued), then runs the request protocol of `calls.py` --
written once, as generators that say when they must wait -- with one of
three drivers: `blocking` (``execute`` and friends), `futures` (``submit``
and friends: one collector thread per handle) and `aio` (``aexecute`` and
friends: the event loop's readiness callbacks). The reply pipes and the side
socket are the handle's `pipe_pool.PipePool`.

A dead writer shows as EOF on the reply pipe (the writer held its only write
end). If the owner restarts the writer, the caller registers a new pipe for
the same slot, naming the request it awaits: the new writer answers it if the
request was still queued, or reports it lost ("outcome unknown") once it has
read everything that was queued before the new pipe arrived. A reply that had
begun when the pipe hit EOF is lost with its writer: "outcome unknown".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from .. import testing
from .._errors import NotPicklable
from .._wire.frames import (
    CAN_HAND_OVER,
    NO_REPLY,
    PICKLE_PROTOCOL,
    WHOLE,
    Kind,
    encode_frame,
)
from .._wire.replies import Result, as_result
from .._wire.state import CLOSED, RUNNING
from .._wire.stats import Stats
from . import aio, blocking, calls, futures
from .lifetime import Dialer, Lifetime, Link, Owner
from .pipe_pool import PipePool
from .session import DEFAULT_IDLE_LIMIT, DEFAULT_TOTAL_LIMIT, Session

P = ParamSpec("P")
R = TypeVar("R")


class Writer:
    """A handle on the writer process. Create one with `mpwriter.start()`,
    or, in any other process of a permitted user, `mpwriter.connect()`.

    Every method may be called from any thread of any process that has the
    handle: the process that started the writer (the *owner*) or connected,
    its forked children (gunicorn workers), and children it passed the
    handle to at creation (``Process`` args, pool ``initargs``) under fork,
    spawn and forkserver. Threads share one handle without a lock: each call
    in flight waits on a reply pipe of its own, so replies never cross
    between threads (a `Session` is used by one thread at a time).

    Guarantees: a call returns only after the COMMIT that made its write
    durable; a call's failure affects no other call; calls made one after the
    other by one thread are applied in that order (``submit`` and friends
    included: they return once the request is sent). Every call ends within
    its timeout, raising `Timeout` (outcome unknown), `QueueFull` (not sent)
    or `WriterUnavailable` when it cannot succeed.

    Each blocking method has a future counterpart (``submit*``) and an
    awaitable one (``a*``) that take the same arguments and ``timeout``.
    """

    def __init__(
        self,
        path: str,
        timeout: float,
        request_fd: int,
        registration: socket.socket,
        state: Any,
        owner: Owner | None = None,
        frame_key: int = 0,
        dialer: Dialer | None = None,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self._link = Link(PipePool(registration, state, frame_key), request_fd)
        self._lifetime = Lifetime(self, owner, dialer)

    def __repr__(self) -> str:
        status = "closed" if self.closed else "open"
        return f"<mpwriter.Writer {self.path!r} {status}>"

    # -- blocking -------------------------------------------------------------

    def execute(self, sql: str, params: Any = (), *, timeout: float | None = None) -> Result:
        """Run one statement, atomically; return once it is committed.

        SQL errors are raised as their `sqlite3` class, and nothing of the
        failed statement is applied.
        """
        # `_encode`, inlined: this is every app's hot path (a Python call fewer).
        link = self._link
        pool = link.pool
        now = time.monotonic()
        deadline = now + (self.timeout if timeout is None else timeout)
        if pool.closed or pool.state.status != RUNNING:
            link = self._revive(link, deadline)  # or raise why not: the handle or the writer
            pool = link.pool
        try:
            payload = pickle.dumps((deadline, now, (sql, params)), PICKLE_PROTOCOL)
        except Exception as exc:
            raise _not_picklable(_EXECUTE, exc) from exc
        value = blocking.request(pool, link.request_fd, _EXECUTE, payload, deadline)
        # `as_result`, in line: this is the path every plain statement takes.
        return value if value.__class__ is Result else Result(*value)

    def executemany(
        self, sql: str, seq_of_params: Iterable[Any], *, timeout: float | None = None
    ) -> Result:
        """Run one statement for each parameter set, atomically; ``rows`` is empty.

        ``seq_of_params`` may be any iterable, a generator included. Past the
        first thousand rows it is streamed (where memfd exists: Linux): read
        and pickled a chunk at a time into a file handed to the writer, which
        reads it back a chunk at a time, so neither side holds all the rows.
        All rows apply or none: if reading the iterable raises, nothing is
        sent and the error propagates; a failing row rolls back every row.
        Elsewhere the rows are gathered in a list first. ``timeout`` counts
        from when the iterable has been read to its end.
        """
        return Result(*blocking.run(self._many(sql, seq_of_params, timeout)))

    def executescript(self, script: str, *, timeout: float | None = None) -> None:
        """Run a script atomically: all of its statements apply, or none.

        Transaction control inside the script is refused (`StatementRefused`).
        """
        self._blocking(Kind.SCRIPT, (script,), timeout)

    @contextlib.contextmanager
    def transaction(self, *, timeout: float | None = None) -> Iterator[Transaction]:
        """Buffer statements here; apply them atomically when the block exits.

        Nothing is sent if the block raises. After the block, ``tx.results``
        holds one `Result` per statement.
        """
        tx = Transaction()
        yield tx
        raw = self._blocking(Kind.TRANSACTION, (tx._statements,), timeout) if tx._statements else ()
        tx.results = [Result(*item) for item in raw]

    def session(
        self,
        *,
        timeout: float | None = None,
        idle_limit: float | None = None,
        total_limit: float | None = None,
        foreign_keys: bool = True,
    ) -> Session:
        """An interactive transaction: statements answered one at a time, then commit.

        ``with writer.session() as s:`` commits on a normal exit and rolls
        back on an exception. While its transaction is open the writer serves
        it alone and holds every other request, so the writer rolls it back
        after ``idle_limit`` seconds without a statement (default 5) or
        ``total_limit`` seconds in all (default 30): the next call raises
        `SessionExpired`. ``timeout`` is each call's (the handle's by
        default). SQLite writers only (`NotSupportedError` on PostgreSQL).

        ``foreign_keys=False`` (also settable later as the session's
        ``foreign_keys`` attribute, read as each transaction opens) runs its
        transactions with SQLite's foreign key enforcement off, as a
        connection's ``PRAGMA foreign_keys=OFF`` would (schema changes that
        rebuild a table need it); only those transactions: the writer turns
        enforcement back on before it serves any other request, and such a
        transaction commits alone (held requests do not share its COMMIT).
        """
        link = self._link
        session = Session(
            link.pool,
            link.request_fd,
            self.timeout if timeout is None else timeout,
            DEFAULT_IDLE_LIMIT if idle_limit is None else idle_limit,
            DEFAULT_TOTAL_LIMIT if total_limit is None else total_limit,
        )
        session.foreign_keys = foreign_keys
        return session

    def call(self, fn: Callable[Concatenate[Any, P], R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(conn, *args, **kwargs)`` in the writer, atomically; return its result.

        ``fn`` must be importable by the writer (a module-level function) and
        its arguments and result picklable. It runs inside the request's
        savepoint: if it raises, its changes are rolled back and the exception
        is re-raised here. It must not commit, roll back or close ``conn``.
        Uses the handle's default timeout; see `call_with_timeout`.
        """
        result: R = self._blocking(_CALL, (fn, args, kwargs), None)
        return result

    def call_with_timeout(
        self,
        timeout: float,
        fn: Callable[Concatenate[Any, P], R],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """`call` with an explicit timeout in seconds."""
        result: R = self._blocking(_CALL, (fn, args, kwargs), timeout)
        return result

    def post(self, sql: str, params: Any = (), *, max_block: float = 0.05) -> bool:
        """Fire and forget: queue a write and return at once, without a reply.

        For observability data (audit logs, metrics) that must never slow
        down or break the business path: it never raises, blocks at most
        ``max_block`` seconds on a full queue, and returns False when it had
        to drop the write (queue full, writer unavailable, unpicklable
        arguments). Drops are counted in `stats()` (``posts_dropped``);
        failures inside the writer are logged there with the statement's head
        and counted by class (``post_errors_by_class``). Not durable on return.
        """
        link = self._link
        pool = link.pool
        local = pool.local
        reported = local.posts_dropped
        try:
            now = time.monotonic()
            if not pool.writer_running():
                link = self._revive(link, now + max_block)
                pool = link.pool
                local = pool.local
            body = (sql, params, reported)
            payload = pickle.dumps((now + self.timeout, now, body), PICKLE_PROTOCOL)
            frame = encode_frame(
                _POST,
                WHOLE,
                local.sender,
                pool.next_request_id(),
                NO_REPLY,
                payload,
                pool.frame_key,
            )
            try:
                os.write(link.request_fd, frame)
            except BlockingIOError:  # a full queue: wait up to max_block for room
                frames = (frame,)
                blocking.run(calls.write_frames(pool, link.request_fd, frames, now + max_block))
        except Exception:
            # Dropped: counted here, reported with the next post that gets through.
            with local.lock:
                local.posts_dropped += 1
            return False
        if reported:
            # Only what this post reported: other threads may have dropped more since.
            with local.lock:
                local.posts_dropped -= reported
        return True

    def stats(self, *, timeout: float | None = None) -> Stats:
        """The writer's figures: requests, batches, commits, errors, queue depth..."""
        figures: Stats = self._blocking(Kind.STATS, (), timeout)
        return figures

    # -- futures ----------------------------------------------------------------

    def submit(
        self, sql: str, params: Any = (), *, timeout: float | None = None
    ) -> concurrent.futures.Future[Result]:
        """`execute`, as a future that resolves once the statement is committed.

        Returns once the request is sent (waiting, up to ``timeout``, while
        the queue is full: so the requests of one thread stay in order), and
        raises what prevented sending it (`QueueFull`, `WriterUnavailable`,
        `NotPicklable`): nothing was sent then. Errors after that are set on
        the future; the request is sent, so the future cannot be cancelled.
        No thread per request: one background thread per handle collects the
        replies of every pending future.
        """
        return self._submit(self._request(Kind.EXECUTE, (sql, params), timeout), as_result)

    def submit_many(
        self, sql: str, seq_of_params: Iterable[Any], *, timeout: float | None = None
    ) -> concurrent.futures.Future[Result]:
        """`executemany`, as a future (see `submit`); the iterable is read here, first."""
        return self._submit(self._many(sql, seq_of_params, timeout), as_result)

    def submit_script(
        self, script: str, *, timeout: float | None = None
    ) -> concurrent.futures.Future[None]:
        """`executescript`, as a future (see `submit`)."""
        return self._submit(self._request(Kind.SCRIPT, (script,), timeout), _to_none)

    def submit_call(
        self, fn: Callable[Concatenate[Any, P], R], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[R]:
        """`call`, as a future (see `submit`); the handle's default timeout."""
        return self._submit(self._request(Kind.CALL, (fn, args, kwargs), None), _same)

    def submit_call_with_timeout(
        self,
        timeout: float,
        fn: Callable[Concatenate[Any, P], R],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> concurrent.futures.Future[R]:
        """`call_with_timeout`, as a future (see `submit`)."""
        return self._submit(self._request(Kind.CALL, (fn, args, kwargs), timeout), _same)

    # -- asyncio ----------------------------------------------------------------

    async def aexecute(self, sql: str, params: Any = (), *, timeout: float | None = None) -> Result:
        """`execute` for asyncio: awaits the commit without blocking the event loop.

        Cancelling the task retires its reply pipe; the outcome is then unknown.
        """
        return Result(*await aio.run(self._request(Kind.EXECUTE, (sql, params), timeout)))

    async def aexecutemany(
        self, sql: str, seq_of_params: Iterable[Any], *, timeout: float | None = None
    ) -> Result:
        """`executemany` for asyncio; the iterable is read (synchronously) first."""
        return Result(*await aio.run(self._many(sql, seq_of_params, timeout)))

    async def aexecutescript(self, script: str, *, timeout: float | None = None) -> None:
        """`executescript` for asyncio."""
        await aio.run(self._request(Kind.SCRIPT, (script,), timeout))

    async def acall(
        self, fn: Callable[Concatenate[Any, P], R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """`call` for asyncio (the handle's default timeout; see `acall_with_timeout`)."""
        result: R = await aio.run(self._request(Kind.CALL, (fn, args, kwargs), None))
        return result

    async def acall_with_timeout(
        self,
        timeout: float,
        fn: Callable[Concatenate[Any, P], R],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """`call_with_timeout` for asyncio."""
        result: R = await aio.run(self._request(Kind.CALL, (fn, args, kwargs), timeout))
        return result

    # -- lifetime ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once this handle, or the writer itself, was closed."""
        pool = self._link.pool
        return pool.closed or pool.state.status == CLOSED

    def close(self, timeout: float | None = None) -> None:
        """Release this handle; in the owner process, stop the writer.

        In the owner: new calls are refused at once, everything already
        queued is served and committed, the WAL is checkpointed, and the
        writer exits and releases its lock file. Returns within ``timeout``
        seconds (the handle's default): a writer not done by then is killed.
        Elsewhere this only releases the handle's reply pipes. Either way,
        the handle's collector thread (``submit``) stops, failing futures
        still pending with `WriterClosed`. Idempotent.
        """
        self._lifetime.close(self, timeout)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # What rebuilds the link in the child being started (or NotPicklable: `for_child`).
        return (_rebuild, (self.path, self.timeout, *self._lifetime.for_child(self._link)))

    def _revive(self, link: Link, deadline: float) -> Link:
        """The link to send on when ``link``'s writer is not running (`Lifetime.revive`)."""
        return self._lifetime.revive(self, link, deadline)

    @property
    def _owner(self) -> Owner | None:
        """The owner, in the process that started the writer only (not a forked child)."""
        return self._lifetime.owner

    # -- request path -----------------------------------------------------------

    def _request(self, kind: Kind, body: tuple[Any, ...], timeout: float | None) -> calls.Step[Any]:
        """The protocol generator of one request, for any driver to run."""
        link, payload, deadline = self._encode(kind, body, timeout)
        return calls.request(link.pool, link.request_fd, kind, payload, deadline)

    def _blocking(self, kind: Kind, body: tuple[Any, ...], timeout: float | None) -> Any:
        """`_request`, run in this thread by `blocking.request`: its straight
        line for the usual request, the protocol's generators for the rest."""
        link, payload, deadline = self._encode(kind, body, timeout)
        return blocking.request(link.pool, link.request_fd, kind, payload, deadline)

    def _encode(
        self, kind: Kind, body: tuple[Any, ...], timeout: float | None
    ) -> tuple[Link, bytes, float]:
        """The link to send on, the pickled request and its deadline (`execute` inlines this)."""
        link = self._link
        now = time.monotonic()
        deadline = now + (self.timeout if timeout is None else timeout)
        if link.pool.closed or link.pool.state.status != RUNNING:
            link = self._revive(link, deadline)  # or raise why not: the handle or the writer
        try:
            payload = pickle.dumps((deadline, now, body), PICKLE_PROTOCOL)
        except Exception as exc:
            raise _not_picklable(kind, exc) from exc
        return link, payload, deadline

    def _many(
        self, sql: str, seq_of_params: Iterable[Any], timeout: float | None
    ) -> calls.Step[Any]:
        """The protocol generator of an executemany: streamed past its first chunk.

        Where no file can be handed over, the rows are gathered in a list and
        sent as one request, as any other.
        """
        if not (CAN_HAND_OVER and testing.faults.hand_over):
            return self._request(Kind.EXECUTEMANY, (sql, list(seq_of_params)), timeout)
        rows = iter(seq_of_params)
        first = list(itertools.islice(rows, calls.STREAM_FIRST_ROWS))
        if len(first) < calls.STREAM_FIRST_ROWS:
            return self._request(Kind.EXECUTEMANY, (sql, first), timeout)
        link = self._link
        budget = self.timeout if timeout is None else timeout
        if link.pool.closed or link.pool.state.status != RUNNING:
            # Its deadline counts from the last row read; the dial's from now.
            link = self._revive(link, time.monotonic() + budget)
        chunks = [first]
        del first  # `write_rows` takes it out of `chunks`: held nowhere else
        return _streamed(link, sql, chunks, rows, budget)

    def _submit(
        self, step: calls.Step[Any], convert: Callable[[Any], Any]
    ) -> concurrent.futures.Future[Any]:
        return futures.submit(self._link.pool, step, convert)


# Looked up once: `Kind.EXECUTE` goes through the enum's class attribute
# lookup, 0.1 us per call on this machine.
_EXECUTE = Kind.EXECUTE
_CALL = Kind.CALL
_POST = Kind.POST


class Transaction:
    """Statements buffered by `Writer.transaction()`, sent together on exit."""

    def __init__(self) -> None:
        self._statements: list[tuple[bool, str, Any]] = []
        self.results: list[Result] | None = None

    def execute(self, sql: str, params: Any = ()) -> None:
        self._statements.append((False, sql, params))

    def executemany(self, sql: str, seq_of_params: Iterable[Any]) -> None:
        self._statements.append((True, sql, list(seq_of_params)))


def _streamed(
    link: Link, sql: str, chunks: list[list[Any]], rows: Iterator[Any], budget: float
) -> calls.Step[Any]:
    """The generator of an executemany whose rows are written to a file
    handed over with its frame; ``budget`` counts from the last row read.

    ``chunks`` holds the rows read so far, and is emptied as they are written.
    """
    pool = link.pool
    fd = calls.new_request_file(pool)
    try:
        written = calls.write_rows(fd, chunks, rows)
        now = time.monotonic()
        deadline = now + budget
        try:
            payload = pickle.dumps((deadline, now, (sql, None)), PICKLE_PROTOCOL)
        except Exception as exc:
            raise NotPicklable(f"cannot send this executemany request: {exc}") from exc
        length = calls.finish_rows(fd, written, payload)
    except BaseException:
        pool.close_fd(fd)
        raise
    return calls.request_streamed(pool, link.request_fd, Kind.EXECUTEMANY, fd, length, deadline)


def _not_picklable(kind: Kind, exc: Exception) -> NotPicklable:
    return NotPicklable(f"cannot send this {kind.name.lower()} request to the writer: {exc}")


def _to_none(value: Any) -> None:
    return None


def _same(value: Any) -> Any:
    return value


def _rebuild(
    path: str,
    timeout: float,
    request_fd: Any,
    registration_fd: Any,
    state: Any,
    frame_key: int,
    dialer: Dialer | None = None,
) -> Writer:
    registration = socket.socket(fileno=registration_fd.detach())
    request = request_fd.detach()
    return Writer(path, timeout, request, registration, state, frame_key=frame_key, dialer=dialer)
