"""The handle callers use: `Writer`, usable from any process that has it.

A call pickles its request here, in the caller (so a bad argument fails at
once, with nothing queued), writes it to the shared request pipe as atomic
frames, then waits for the reply on a reply pipe that only this request uses.

Reply pipes are pooled per process: creating one costs a registration (its
write end travels to the writer over a Unix socket), so a process keeps the
pipes it made and lends each to one request at a time. A request that ends in
a timeout or an error whose effect on the pipe is unknown *retires* its pipe
instead of returning it, so a late reply can never be read by the next request.

A dead writer shows as EOF on the reply pipe (the writer held its only write
end). If the owner restarts the writer, the caller registers a new pipe for
the same slot, naming the request it awaits: the new writer answers it if the
request was still queued, or reports it lost ("outcome unknown") once it has
read everything that was queued before the new pipe arrived.

After a fork, the child gets fresh per-process state (new sender token, no
pipes, new locks); it never touches its parent's pipes (`os.register_at_fork`
covers raw ``os.fork()`` as gunicorn uses it, not only multiprocessing).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import pickle
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import context as mp_context
from multiprocessing import reduction
from typing import Any, Protocol

from . import _aio
from ._errors import (
    NotPicklable,
    QueueFull,
    Timeout,
    WriterClosed,
    WriterCrashed,
    WriterUnavailable,
)
from ._futures import Collector, Pending
from ._reply import Incoming, Result, millis, no_reply, queue_full, unpack_reply
from ._shared import CLOSED, DEAD, RUNNING, describe_exit
from ._wire import (
    CAN_HAND_OVER,
    HAND_OVER_MIN,
    HANDED_OVER,
    MAX_PAYLOAD,
    PAYLOAD_HANDOVER,
    PAYLOAD_TAG,
    PICKLE_PROTOCOL,
    PIPE_REGISTRATION,
    PIPE_TAG,
    WHOLE,
    Kind,
    encode_frame,
    encode_frames,
    make_sender_token,
)
from ._writer import NO_REPLY

_READ_SIZE = 1 << 16


class _Owner(Protocol):
    """What the owning process adds to its handle (see `_owner.py`)."""

    def close(self, timeout: float) -> None: ...


class _Slot:
    """A reply pipe: this process reads ``fd``; the writer holds the write end."""

    __slots__ = ("fd", "number", "poller")

    def __init__(self, number: int, fd: int) -> None:
        self.number = number
        self.fd = fd
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)

    def replace_fd(self, fd: int) -> None:
        self.poller.unregister(self.fd)
        os.close(self.fd)
        self.fd = fd
        self.poller.register(fd, select.POLLIN)


class _ProcessState:
    """A handle's per-process state; replaced wholesale in a forked child."""

    def __init__(self) -> None:
        self.sender = make_sender_token(os.getpid())
        self.lock = threading.Lock()
        self.free: list[_Slot] = []
        self.slot_numbers = itertools.count()
        self.request_ids = itertools.count()
        self.collector: Collector | None = None
        self.posts_dropped = 0  # not yet reported to the writer
        # Every descriptor this state opened: a forked child closes them all,
        # including those of requests in flight in another thread at the fork.
        self.fds: set[int] = set()


_handles: weakref.WeakSet[Writer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handle in list(_handles):
        handle._forget_parent_state()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Writer:
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
        self._registration = registration
        self._state = state
        self._owner = owner
        self._closed_here = False
        self._local = _ProcessState()
        _handles.add(self)

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
        try:
            now = time.monotonic()
            if self._closed_here or self._state.status != RUNNING:
                raise self._unavailable(sent=False)
            body = (sql, params, local.posts_dropped)
            payload = pickle.dumps((now + self.timeout, now, body), PICKLE_PROTOCOL)
            self._send(Kind.POST, payload, NO_REPLY, now + max_block)
        except Exception:
            # Dropped: counted here, reported with the next post that gets through.
            local.posts_dropped += 1
            return False
        local.posts_dropped = 0
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

    def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The writer's figures: requests, batches, commits, errors, queue depth..."""
        figures: dict[str, Any] = self._call(Kind.STATS, (), timeout)
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
        os.close(self._request_fd)
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
        return unpack_reply(reply, request_id)

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
        if len(payload) >= HAND_OVER_MIN and CAN_HAND_OVER:
            self._hand_over(payload, request_id, deadline)
            flags = WHOLE | HANDED_OVER
            frames = iter((encode_frame(kind, flags, sender, request_id, slot_number, b""),))
        else:
            frames = encode_frames(kind, sender, request_id, slot_number, payload)
        return _Outgoing(self, request_id, frames)

    def _hand_over(self, payload: bytes, request_id: int, deadline: float) -> None:
        fd = os.memfd_create("mpwriter-request", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as file:
                file.write(payload)
            sender = self._local.sender
            message = PAYLOAD_HANDOVER.pack(PAYLOAD_TAG, sender, request_id, len(payload))
            self._send_side_message(message, fd, deadline, sent=False)
        finally:
            os.close(fd)

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

    def _await_reply(self, slot: _Slot, request_id: int, deadline: float) -> bytes:
        """The whole reply to ``request_id``; raises on timeout or a lost writer."""
        incoming = Incoming()
        while True:
            if not slot.poller.poll(millis(max(deadline - time.monotonic(), 0.0))):
                raise no_reply()
            reply = self._receive(slot, incoming, request_id, deadline)
            if reply is not None:
                return reply

    def _receive(
        self, slot: _Slot, incoming: Incoming, request_id: int, deadline: float
    ) -> bytes | None:
        """Read what ``slot`` holds; return the whole reply once it is complete."""
        chunk = os.read(slot.fd, _READ_SIZE)
        if chunk:
            return incoming.take(chunk)
        self._after_eof(slot, incoming, request_id, deadline)
        return None

    def _after_eof(self, slot: _Slot, incoming: Incoming, request_id: int, deadline: float) -> None:
        """The writer that held this pipe is gone, possibly part-way through
        the reply: wait for its successor, if one may come."""
        if incoming.started or self._state.status != RUNNING:
            raise self._unavailable(sent=True)
        self._reregister(slot, request_id, deadline)

    def _reregister(self, slot: _Slot, request_id: int, deadline: float) -> None:
        """Hand a new pipe for ``slot`` to the next writer, awaiting ``request_id``.

        The registration waits in the socket until a new writer reads it. If
        the owner gives up instead, it closes the socket, which closes the
        pipe's write end, and this caller sees EOF again.
        """
        read_fd, write_fd = self._new_pipe()
        try:
            self._register(slot.number, write_fd, request_id, deadline, sent=True)
        except BaseException:
            self._close_fd(read_fd)
            raise
        finally:
            self._close_fd(write_fd)
        self._local.fds.discard(slot.fd)
        slot.replace_fd(read_fd)

    def _unavailable(self, *, sent: bool) -> WriterUnavailable:
        outcome = "the outcome is unknown" if sent else "the request was not sent"
        state = self._state
        if self._closed_here:
            return WriterClosed(f"this Writer handle was closed; {outcome}")
        if state.status == CLOSED:
            return WriterClosed(f"the writer was closed; {outcome}")
        how = describe_exit(state.last_exit) if state.status == DEAD else "died"
        return WriterCrashed(f"the writer process (pid {state.writer_pid}) {how}; {outcome}")

    # -- reply pipes --------------------------------------------------------------

    def _borrow_slot(self, deadline: float) -> _Slot:
        free = self._local.free
        return free.pop() if free else self._new_slot(deadline)

    def _new_slot(self, deadline: float) -> _Slot:
        number = next(self._local.slot_numbers) % NO_REPLY
        read_fd, write_fd = self._new_pipe()
        try:
            self._register(number, write_fd, 0, deadline, sent=False)
        except BaseException:
            self._close_fd(read_fd)
            raise
        finally:
            # The writer now holds the only write end: EOF here means it died.
            self._close_fd(write_fd)
        return _Slot(number, read_fd)

    def _new_pipe(self) -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        self._local.fds.update((read_fd, write_fd))
        os.set_blocking(read_fd, False)
        return read_fd, write_fd

    def _close_fd(self, fd: int) -> None:
        self._local.fds.discard(fd)
        os.close(fd)

    def _register(
        self, number: int, write_fd: int, awaiting: int, deadline: float, *, sent: bool
    ) -> None:
        message = PIPE_REGISTRATION.pack(PIPE_TAG, self._local.sender, number, awaiting)
        self._send_side_message(message, write_fd, deadline, sent=sent)

    def _send_side_message(self, message: bytes, fd: int, deadline: float, *, sent: bool) -> None:
        """Send ``fd`` to the writer with ``message``, waiting up to ``deadline``."""
        while True:
            try:
                socket.send_fds(self._registration, [message], [fd])
                return
            except BlockingIOError:
                pass
            except OSError:
                # EPIPE, ECONNREFUSED, ENOTCONN: nobody will ever read it.
                raise self._unavailable(sent=sent) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if sent:
                    raise Timeout("no writer took over within the timeout; the outcome is unknown")
                raise QueueFull("the writer's side socket stayed full past the timeout; not sent")
            select.select([], [self._registration], [], remaining)

    def _retire(self, slot: _Slot) -> None:
        self._close_fd(slot.fd)

    def _collector(self) -> Collector:
        local = self._local
        with local.lock:
            if local.collector is None or local.collector.broken:
                local.collector = Collector(self)
            return local.collector

    def _forget_parent_state(self) -> None:
        """In a forked child: drop the parent's pipes; never read from them."""
        parent = self._local
        self._local = _ProcessState()
        for fd in parent.fds:
            os.close(fd)
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


def _rebuild(
    path: str,
    timeout: float,
    request_fd: Any,
    registration_fd: Any,
    state: Any,
) -> Writer:
    registration = socket.socket(fileno=registration_fd.detach())
    return Writer(path, timeout, request_fd.detach(), registration, state)
