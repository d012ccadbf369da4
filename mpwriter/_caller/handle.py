"""The handle callers use: `Writer`, usable from any process that has it.

A call pickles its request here, in the caller (so a bad argument fails at
once, with nothing queued), writes it to the shared request pipe as atomic
frames, then waits for the reply on a reply pipe that only this request uses.
A payload too large for one frame goes as several frames or, where memfd
exists, is handed over as a file on the side socket before its one frame.

The reply pipes -- their per-process pool, their registration with the writer,
retiring them, forgetting them after a fork -- are `_pipe_pool.PipePool`, the
base of `Writer`; this module takes a pipe from the pool for each request and
gives it back only once the whole reply was read (otherwise it retires it).

A dead writer shows as EOF on the reply pipe (the writer held its only write
end). If the owner restarts the writer, the caller registers a new pipe for
the same slot, naming the request it awaits: the new writer answers it if the
request was still queued, or reports it lost ("outcome unknown") once it has
read everything that was queued before the new pipe arrived. A reply that had
begun when the pipe hit EOF is lost with its writer: "outcome unknown".

Futures (`submit`) and asyncio share this request path; see `_futures.py`
and `_aio.py`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pickle
import select
import socket
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import context as mp_context
from multiprocessing import reduction
from typing import Any, Protocol

from .. import testing
from .._errors import NotPicklable, WriterClosed, WriterCrashed, WriterUnavailable
from .._wire.frames import (
    CAN_HAND_OVER,
    HAND_OVER_MIN,
    HANDED_OVER,
    MAX_PAYLOAD,
    NO_REPLY,
    PICKLE_PROTOCOL,
    WHOLE,
    Kind,
    encode_frame,
    encode_frames,
)
from .._wire.replies import Incoming, Result, millis, no_reply, queue_full, unpack_reply
from .._wire.state import CLOSED, DEAD, RUNNING, describe_exit
from .._wire.stats import Stats
from . import aio as _aio
from .futures import Collector, Pending
from .pipe_pool import PipePool, Slot

_READ_SIZE = 1 << 16


class _Owner(Protocol):
    """What the owning process adds to its handle (see `_owner.py`)."""

    def close(self, timeout: float) -> None: ...


class Writer(PipePool):
    """A handle on the writer process. Create one with `mpwriter.start()`.

    Every method may be called from any thread of any process that has the
    handle: the process that started the writer (the *owner*), its forked
    children (gunicorn workers), and children it passed the handle to at
    creation (``Process`` args, pool ``initargs``) under fork, spawn and
    forkserver.

    Guarantees: a call returns only after the COMMIT that made its write
    durable; a call's failure affects no other call; calls made one after the
    other by one thread are applied in that order. Every call ends within its
    timeout, raising `Timeout` (outcome unknown), `QueueFull` (not sent) or
    `WriterUnavailable` when it cannot succeed.
    """

    def __init__(
        self,
        path: str,
        timeout: float,
        request_fd: int,
        registration: socket.socket,
        state: Any,
        owner: _Owner | None = None,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self._request_fd = request_fd
        self._state = state
        self._owner = owner
        self._closed_here = False
        super().__init__(registration)

    def __repr__(self) -> str:
        status = "closed" if self.closed else "open"
        return f"<mpwriter.Writer {self.path!r} {status}>"

    # -- public API -----------------------------------------------------------

    def execute(self, sql: str, params: Any = (), *, timeout: float | None = None) -> Result:
        """Run one statement, atomically; return once it is committed.

        SQL errors are raised as their `sqlite3` class, and nothing of the
        failed statement is applied.
        """
        return Result(*self._call(Kind.EXECUTE, (sql, params), timeout))

    def executemany(
        self, sql: str, seq_of_params: Iterable[Any], *, timeout: float | None = None
    ) -> Result:
        """Run one statement for each parameter set, atomically; ``rows`` is empty."""
        return Result(*self._call(Kind.EXECUTEMANY, (sql, list(seq_of_params)), timeout))

    def executescript(self, script: str, *, timeout: float | None = None) -> None:
        """Run a script atomically: all of its statements apply, or none.

        Transaction control inside the script is refused (`StatementRefused`).
        """
        self._call(Kind.SCRIPT, (script,), timeout)

    @contextlib.contextmanager
    def transaction(self, *, timeout: float | None = None) -> Iterator[Transaction]:
        """Buffer statements here; apply them atomically when the block exits.

        Nothing is sent if the block raises. After the block, ``tx.results``
        holds one `Result` per statement.
        """
        tx = Transaction()
        yield tx
        if tx._statements:
            raw = self._call(Kind.TRANSACTION, (tx._statements,), timeout)
            tx.results = [Result(*item) for item in raw]
        else:
            tx.results = []

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(conn, *args, **kwargs)`` in the writer, atomically; return its result.

        ``fn`` must be importable by the writer (a module-level function) and
        its arguments and result picklable. It runs inside the request's
        savepoint: if it raises, its changes are rolled back and the exception
        is re-raised here. It must not commit, roll back or close ``conn``.
        Uses the handle's default timeout; see `call_with_timeout`.
        """
        return self._call(Kind.CALL, (fn, args, kwargs), None)

    def call_with_timeout(
        self, timeout: float, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        """`call` with an explicit timeout in seconds."""
        return self._call(Kind.CALL, (fn, args, kwargs), timeout)

    def submit(
        self, sql: str, params: Any = (), *, timeout: float | None = None
    ) -> concurrent.futures.Future[Result]:
        """Send a statement now; the future resolves when it is committed.

        No thread per request: one background thread per process collects the
        replies of every pending future. Errors are set on the future; the
        request is already sent, so the future cannot be cancelled.
        """
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        deadline, payload = self._prepare(Kind.EXECUTE, (sql, params), timeout)
        slot = self._borrow_slot(deadline)
        try:
            request_id = self._send(Kind.EXECUTE, payload, slot.number, deadline)
        except BaseException:
            self._retire(slot)
            raise
        pending = Pending(slot, request_id, future, deadline)
        while not self._collector().add(pending):
            pass  # that collector broke (and logged why): the next call starts a new one
        return future

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
        local = self._local
        reported = local.posts_dropped
        try:
            now = time.monotonic()
            if self._closed_here or self._state.status != RUNNING:
                raise self._unavailable(sent=False)
            body = (sql, params, reported)
            payload = pickle.dumps((now + self.timeout, now, body), PICKLE_PROTOCOL)
            self._send(Kind.POST, payload, NO_REPLY, now + max_block)
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

    # -- asyncio ----------------------------------------------------------------

    async def aexecute(self, sql: str, params: Any = (), *, timeout: float | None = None) -> Result:
        """`execute` for asyncio: awaits the commit without blocking the event loop."""
        return Result(*await _aio.request(self, Kind.EXECUTE, (sql, params), timeout))

    async def aexecutemany(
        self, sql: str, seq_of_params: Iterable[Any], *, timeout: float | None = None
    ) -> Result:
        """`executemany` for asyncio."""
        body = (sql, list(seq_of_params))
        return Result(*await _aio.request(self, Kind.EXECUTEMANY, body, timeout))

    async def aexecutescript(self, script: str, *, timeout: float | None = None) -> None:
        """`executescript` for asyncio."""
        await _aio.request(self, Kind.SCRIPT, (script,), timeout)

    async def acall(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """`call` for asyncio (the handle's default timeout applies)."""
        return await _aio.request(self, Kind.CALL, (fn, args, kwargs), None)

    def stats(self, *, timeout: float | None = None) -> Stats:
        """The writer's figures: requests, batches, commits, errors, queue depth..."""
        figures: Stats = self._call(Kind.STATS, (), timeout)
        return figures

    @property
    def closed(self) -> bool:
        """True once this handle, or the writer itself, was closed."""
        return self._closed_here or self._state.status == CLOSED

    def close(self, timeout: float | None = None) -> None:
        """Release this handle; in the owner process, stop the writer.

        In the owner: new calls are refused at once, everything already
        queued is served and committed, the WAL is checkpointed, and the
        writer exits and releases its lock file. Waits up to ``timeout``
        seconds (the handle's default) before terminating the writer.
        Elsewhere this only releases the handle's reply pipes. Idempotent.
        """
        if self._closed_here:
            return
        self._closed_here = True
        owner = self._owner
        if owner is not None:
            owner.close(self.timeout if timeout is None else timeout)
        with self._local.lock:
            free, self._local.free = self._local.free, []
        for slot in free:
            self._retire(slot)
        _disarm(self._request_fd)
        weakref.finalize(self, os.close, self._request_fd)
        self._registration.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # Descriptors can travel only while a child is being started (they are
        # then passed down with the new process); anywhere else -- a pool task
        # argument, a queue -- there is no channel for them.
        if mp_context.get_spawning_popen() is None:
            raise NotPicklable(
                "a mpwriter.Writer can only be passed to a child process when it is"
                " created (Process args, Pool/ProcessPoolExecutor initializer"
                " arguments: see mpwriter.attach) or inherited through fork; it"
                " cannot be sent as a task argument or through a queue"
            )
        return (
            _rebuild,
            (
                self.path,
                self.timeout,
                reduction.DupFd(self._request_fd),
                reduction.DupFd(self._registration.fileno()),
                self._state,
            ),
        )

    # -- request path -----------------------------------------------------------

    def _call(self, kind: Kind, body: tuple[Any, ...], timeout: float | None) -> Any:
        # The hot path of every synchronous call, kept flat: a typical request
        # is one frame, written at once, and one reply, read in one chunk.
        deadline, payload = self._prepare(kind, body, timeout)
        free = self._local.free
        slot = free.pop() if free else self._new_slot(deadline)
        try:
            request_id = self._send(kind, payload, slot.number, deadline)
            reply = self._await_reply(slot, request_id, deadline)
        except BaseException:
            # Whatever went wrong, the pipe may still receive a reply.
            self._retire(slot)
            raise
        # A whole reply was read: the pipe is clean, even if the reply is an error.
        free.append(slot)
        return unpack_reply(reply)

    def _prepare(
        self, kind: Kind, body: tuple[Any, ...], timeout: float | None
    ) -> tuple[float, bytes]:
        if self._closed_here:
            raise WriterClosed("this Writer handle was closed; the request was not sent")
        if self._state.status != RUNNING:
            raise self._unavailable(sent=False)
        now = time.monotonic()
        deadline = now + (self.timeout if timeout is None else timeout)
        try:
            payload = pickle.dumps((deadline, now, body), PICKLE_PROTOCOL)
        except Exception as exc:
            raise NotPicklable(
                f"cannot send this {kind.name.lower()} request to the writer: {exc}"
            ) from exc
        return deadline, payload

    def _outgoing(self, kind: Kind, payload: bytes, slot_number: int, deadline: float) -> _Outgoing:
        """The frames of a request, ready to pump; a large payload is handed
        over on the side socket first (see `_wire`)."""
        sender = self._local.sender
        request_id = self._next_request_id()
        if len(payload) >= HAND_OVER_MIN and CAN_HAND_OVER and testing.faults.hand_over:
            self._hand_over(payload, request_id, deadline)
            flags = WHOLE | HANDED_OVER
            frames = iter((encode_frame(kind, flags, sender, request_id, slot_number, b""),))
        else:
            frames = encode_frames(kind, sender, request_id, slot_number, payload)
        return _Outgoing(self, request_id, frames)

    def _next_request_id(self) -> int:
        # Never 0: a registration awaiting request 0 is a fresh one.
        return next(self._local.request_ids) % 0xFFFFFFFF + 1

    def _send(self, kind: Kind, payload: bytes, slot_number: int, deadline: float) -> int:
        if len(payload) <= MAX_PAYLOAD:
            request_id = self._next_request_id()
            frame = encode_frame(kind, WHOLE, self._local.sender, request_id, slot_number, payload)
            try:
                os.write(self._request_fd, frame)
                return request_id
            except BlockingIOError:
                outgoing = _Outgoing(self, request_id, iter((frame,)))
            except BrokenPipeError:
                raise self._unavailable(sent=False) from None
        else:
            outgoing = self._outgoing(kind, payload, slot_number, deadline)
        poller: select.poll | None = None
        while not outgoing.pump():
            if poller is None:
                poller = select.poll()
                poller.register(self._request_fd, select.POLLOUT)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise queue_full()
            poller.poll(millis(remaining))
        return outgoing.request_id

    def _await_reply(self, slot: Slot, request_id: int, deadline: float) -> bytes:
        """The whole reply to ``request_id``; raises on timeout or a lost writer."""
        incoming = Incoming(request_id)
        while True:
            if not slot.poller.poll(millis(max(deadline - time.monotonic(), 0.0))):
                raise no_reply()
            reply = self._receive(slot, incoming, request_id, deadline)
            if reply is not None:
                return reply

    def _receive(
        self, slot: Slot, incoming: Incoming, request_id: int, deadline: float
    ) -> bytes | None:
        """Read what ``slot`` holds; return the whole reply once it is complete."""
        chunk = os.read(slot.fd, _READ_SIZE)
        if chunk:
            return incoming.take(chunk)
        self._after_eof(slot, incoming, request_id, deadline)
        return None

    def _after_eof(self, slot: Slot, incoming: Incoming, request_id: int, deadline: float) -> None:
        """The writer that held this pipe is gone, possibly part-way through
        the reply: wait for its successor, if one may come."""
        if incoming.started or self._state.status != RUNNING:
            raise self._unavailable(sent=True)
        self._reregister(slot, request_id, deadline)

    def _unavailable(self, *, sent: bool) -> WriterUnavailable:
        outcome = "the outcome is unknown" if sent else "the request was not sent"
        state = self._state
        if self._closed_here:
            return WriterClosed(f"this Writer handle was closed; {outcome}")
        if state.status == CLOSED:
            return WriterClosed(f"the writer was closed; {outcome}")
        how = describe_exit(state.last_exit) if state.status == DEAD else "died"
        return WriterCrashed(f"the writer process (pid {state.writer_pid}) {how}; {outcome}")

    def _collector(self) -> Collector:
        local = self._local
        with local.lock:
            if local.collector is None or local.collector.broken:
                local.collector = Collector(self)
            return local.collector

    def _forget_parent_state(self) -> None:
        super()._forget_parent_state()
        self._owner = None  # only the process that started the writer owns it


class Transaction:
    """Statements buffered by `Writer.transaction()`, sent together on exit."""

    def __init__(self) -> None:
        self._statements: list[tuple[bool, str, Any]] = []
        self.results: list[Result] | None = None

    def execute(self, sql: str, params: Any = ()) -> None:
        self._statements.append((False, sql, params))

    def executemany(self, sql: str, seq_of_params: Iterable[Any]) -> None:
        self._statements.append((True, sql, list(seq_of_params)))


class _Outgoing:
    """A request's frames, written as far as the queue takes them without blocking."""

    __slots__ = ("_frames", "_next", "_writer", "request_id")

    def __init__(self, writer: Writer, request_id: int, frames: Iterator[bytes]) -> None:
        self._writer = writer
        self.request_id = request_id
        self._frames = frames
        self._next: bytes | None = next(frames)

    def pump(self) -> bool:
        """Write frames until done (True) or the queue is full (False)."""
        fd = self._writer._request_fd
        while self._next is not None:
            try:
                os.write(fd, self._next)
            except BlockingIOError:
                return False
            except BrokenPipeError:
                # No reader is left: the writer is gone for good. A request
                # cut short here is incomplete and will never be run.
                raise self._writer._unavailable(sent=False) from None
            self._next = next(self._frames, None)
        return True


def _disarm(fd: int) -> None:
    """Point ``fd`` at a pipe nobody reads, keeping its number.

    Other threads may be sending on it while the handle closes. A closed
    number is taken by the next open() anywhere in the process, and their
    frames would land in that file; on a pipe without a reader they fail
    with EPIPE instead, which they report as `WriterClosed`. The number is
    released when the handle is collected.
    """
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.dup2(write_fd, fd, inheritable=False)
    os.close(write_fd)


def _rebuild(
    path: str,
    timeout: float,
    request_fd: Any,
    registration_fd: Any,
    state: Any,
) -> Writer:
    registration = socket.socket(fileno=registration_fd.detach())
    return Writer(path, timeout, request_fd.detach(), registration, state)
