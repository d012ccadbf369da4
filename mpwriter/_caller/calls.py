"""The caller's request protocol, written once, as generators that do no waiting.

Each step that would wait yields a `Wait` -- ``(fd, events, deadline)``: "resume
me when ``fd`` is ready for ``events``, or at ``deadline``" -- and the driver running the generator
sends back True (ready) or False (the deadline passed). The drivers are thin
and know nothing of the protocol:

- `blocking.run`: poll in the calling thread (``execute`` and friends; under
  gevent's monkey-patching, that poll is gevent's and yields to the hub);
- `futures.Collector`: one thread per handle, polling the waits of every
  pending future at once (``submit`` and friends);
- `aio.run`: the event loop's readiness callbacks (``aexecute`` and friends).

The protocol of one request (`request`):

1. borrow a reply slot from the pool, or make one: a new pipe whose write end
   is registered with the writer on the side socket (which may be full:
   *wait writable*);
2. send the request's frames on the shared request pipe (full queue: *wait
   writable*); a bulk payload is first handed over as a memfd on the side
   socket (*wait writable*), and so is a streamed ``executemany``
   (`request_streamed`: its rows were written into the memfd a chunk at a
   time, by `write_rows`, before the protocol starts);
3. wait for the reply on the slot's pipe (*wait readable*), reading it as it
   comes; at EOF, if the writer was restarted (the shared state still says
   it runs), register a new pipe for the same slot, naming the request it
   awaits (*wait writable* on the side socket), and go on waiting;
4. give the slot back only after a whole reply; on any error, timeout or
   cancellation (``GeneratorExit`` from ``close()``, which every driver calls
   when it gives up on a generator: asyncio's cancellation, an interrupt),
   retire it, because a reply may still come into it.

Contract the drivers rely on: a generator yields a *readable* wait for the
first time exactly when its request was sent in full (the waits before that
are all *writable* ones). `Writer.submit` sends in the caller's thread up to
that point, so that requests one thread sends stay in order.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeVar

from .. import testing
from .._errors import QueueFull, Timeout
from .._wire.frames import (
    CAN_HAND_OVER,
    HAND_OVER_MIN,
    HANDED_OVER,
    MAX_PAYLOAD,
    PAYLOAD_HANDOVER,
    PAYLOAD_TAG,
    PIPE_REGISTRATION,
    PIPE_TAG,
    STREAMED,
    WHOLE,
    Kind,
    encode_frame,
    encode_frames,
)
from .._wire.replies import Incoming, no_reply, queue_full, read_reply, unpack_reply

# The streamed file's encoder, re-exported: the handle writes it through this module.
from .._wire.streamed import STREAM_CHUNK_BYTES as STREAM_CHUNK_BYTES
from .._wire.streamed import STREAM_CHUNK_ROWS_MAX as STREAM_CHUNK_ROWS_MAX
from .._wire.streamed import STREAM_FIRST_ROWS as STREAM_FIRST_ROWS
from .._wire.streamed import finish_rows as finish_rows
from .._wire.streamed import write_rows as write_rows
from .pipe_pool import PipePool, Slot

READ = select.POLLIN
WRITE = select.POLLOUT

T = TypeVar("T")


# What a step waits for: ``(fd, events, deadline)``. Resume the generator
# once ``fd`` is ready for ``events`` (`READ` or `WRITE`), sending True; or at
# ``deadline`` (`time.monotonic`), sending False. A plain tuple, not a
# NamedTuple: building one of those runs Python code on every wait.
Wait = tuple[int, int, float]


# A protocol step: yields waits, is sent readiness, returns its result.
Step = Generator[Wait, bool, T]


def request(
    pool: PipePool, request_fd: int, kind: Kind, payload: bytes, deadline: float
) -> Step[Any]:
    """One request, from borrowing a slot to the decoded reply (see the module).

    Raises `QueueFull` (not sent), `Timeout` (outcome unknown),
    `WriterUnavailable`, or the error the writer replied with.
    """
    # The hot path of every call, kept flat: a typical request is one frame,
    # written at once, and one reply, read in one chunk.
    local = pool.local
    free = local.free
    try:
        slot = free.pop()  # atomic: another thread may take the last pipe
    except IndexError:
        slot = yield from new_slot(pool, deadline)
    try:
        if len(payload) <= MAX_PAYLOAD:
            request_id = next(local.request_ids) % 0xFFFFFFFF + 1  # pool.next_request_id()
            frame = encode_frame(
                kind, WHOLE, local.sender, request_id, slot.number, payload, pool.frame_key
            )
            try:
                os.write(request_fd, frame)
            except BlockingIOError:
                yield from write_frames(pool, request_fd, (frame,), deadline)
            except BrokenPipeError:
                raise pool.unavailable(sent=False) from None
        else:
            request_id = yield from send_bulk(pool, request_fd, kind, payload, slot, deadline)
        # The first turn of `receive`, inlined: a generator fewer per call on
        # the hot path. A reply that does not come whole in one
        # read, or a writer that died, goes on in `receive`.
        if not (yield (slot.fd, READ, deadline)):
            raise no_reply()
        reply: bytes | bytearray | Incoming | None
        try:
            reply = read_reply(slot.fd, request_id)
        except EOFError:
            yield from after_eof(pool, slot, False, request_id, deadline)
            reply = None
        if not isinstance(reply, bytes):
            reply = yield from receive(pool, slot, request_id, deadline, reply)
    except BaseException:
        # Whatever went wrong, the pipe may still receive a reply.
        pool.retire(slot)
        raise
    # A whole reply was read: the pipe is clean, even if the reply is an error.
    free.append(slot)
    return unpack_reply(reply)


def new_slot(pool: PipePool, deadline: float) -> Step[Slot]:
    """A new reply pipe, registered with the writer (side socket full: `QueueFull`)."""
    number = pool.next_slot_number()
    read_fd, write_fd = pool.new_pipe()
    try:
        message = PIPE_REGISTRATION.pack(PIPE_TAG, pool.local.sender, number, 0)
        yield from send_side_message(pool, message, write_fd, deadline, sent=False)
    except BaseException:
        pool.close_fd(read_fd)
        raise
    finally:
        # The writer now holds the only write end: EOF here means it died.
        pool.close_fd(write_fd)
    return pool.open_slot(number, read_fd)


def send_bulk(
    pool: PipePool, request_fd: int, kind: Kind, payload: bytes, slot: Slot, deadline: float
) -> Step[int]:
    """Send a payload too large for one frame; return its request id.

    Handed over as a memfd before its one frame where that exists (it then
    never waits on the request queue's room), else as several frames.
    """
    sender = pool.local.sender
    key = pool.frame_key
    request_id = pool.next_request_id()
    frames: Iterable[bytes]
    if len(payload) >= HAND_OVER_MIN and CAN_HAND_OVER and testing.faults.hand_over:
        yield from hand_over(pool, payload, request_id, deadline)
        flags = WHOLE | HANDED_OVER
        frames = (encode_frame(kind, flags, sender, request_id, slot.number, b"", key),)
    else:
        frames = encode_frames(kind, sender, request_id, slot.number, payload, key)
    yield from write_frames(pool, request_fd, frames, deadline)
    return request_id


def write_frames(
    pool: PipePool, request_fd: int, frames: Iterable[bytes], deadline: float
) -> Step[None]:
    """Write ``frames`` to the request pipe, waiting while it is full.

    Each frame is at most PIPE_BUF bytes, so each write is all or nothing.
    A request cut short (deadline, dead writer) is incomplete, and the writer
    drops it: it is "not sent".
    """
    for frame in frames:
        while True:
            try:
                os.write(request_fd, frame)
                break
            except BlockingIOError:
                pass
            except BrokenPipeError:
                # No reader is left: the writer is gone for good.
                raise pool.unavailable(sent=False) from None
            if not (yield (request_fd, WRITE, deadline)):
                raise queue_full()


def receive(
    pool: PipePool,
    slot: Slot,
    request_id: int,
    deadline: float,
    incoming: Incoming | None = None,
    on_eof: Callable[[], None] | None = None,
) -> Step[bytes | bytearray]:
    """The whole reply to ``request_id``; raises on timeout or a lost writer.

    ``incoming`` holds the start of the reply when some of it was read already.
    ``on_eof`` runs when the writer is gone, before the request waits for a
    successor: it raises if this request cannot be resumed by one (a session
    whose transaction died with its writer).
    """
    while True:
        if not (yield (slot.fd, READ, deadline)):
            raise no_reply()
        try:
            if incoming is None:
                first = read_reply(slot.fd, request_id)
                if isinstance(first, bytes):
                    return first
                incoming = first
            else:
                reply = incoming.read(slot.fd)
                if reply is not None:
                    return reply
        except EOFError:
            if on_eof is not None:
                on_eof()
            yield from after_eof(pool, slot, incoming is not None, request_id, deadline)


def receive_rest(
    pool: PipePool, slot: Slot, request_id: int, deadline: float, chunk: bytes
) -> Step[bytes | bytearray]:
    """The whole reply to ``request_id`` whose first read (a driver's own)
    brought ``chunk`` and not the whole reply: nothing (EOF), a part of it,
    or a header naming another request (`Error`)."""
    if not chunk:
        yield from after_eof(pool, slot, False, request_id, deadline)
        return (yield from receive(pool, slot, request_id, deadline))
    incoming = Incoming(request_id)
    reply = incoming.take(chunk)
    if reply is not None:
        return reply
    return (yield from receive(pool, slot, request_id, deadline, incoming))


def after_eof(
    pool: PipePool, slot: Slot, started: bool, request_id: int, deadline: float
) -> Step[None]:
    """The writer that held ``slot``'s pipe is gone, possibly part-way through
    the reply (``started``): wait for its successor, if one may come, on a new pipe."""
    if started or not pool.writer_running():
        raise pool.unavailable(sent=True) from None
    yield from reregister(pool, slot, request_id, deadline)


def reregister(pool: PipePool, slot: Slot, request_id: int, deadline: float) -> Step[None]:
    """Hand a new pipe for ``slot`` to the next writer, awaiting ``request_id``.

    The registration waits in the socket until a new writer reads it. If the
    owner gives up instead, it closes the socket, which closes the pipe's
    write end, and this caller sees EOF again.
    """
    hook = testing.faults.before_reregister
    if hook is not None:
        hook()
    read_fd, write_fd = pool.new_pipe()
    try:
        message = PIPE_REGISTRATION.pack(PIPE_TAG, pool.local.sender, slot.number, request_id)
        yield from send_side_message(pool, message, write_fd, deadline, sent=True)
    except BaseException:
        pool.close_fd(read_fd)
        raise
    finally:
        pool.close_fd(write_fd)
    pool.replace_fd(slot, read_fd)
    hook = testing.faults.after_reregister
    if hook is not None:
        hook()


def hand_over(pool: PipePool, payload: bytes, request_id: int, deadline: float) -> Step[None]:
    """Send ``payload`` as a memfd, for the frame of ``request_id`` that follows."""
    fd = new_request_file(pool)
    try:
        with open(fd, "wb", closefd=False) as file:
            file.write(payload)  # memory, not a disk: this never waits on a device
        message = PAYLOAD_HANDOVER.pack(PAYLOAD_TAG, pool.local.sender, request_id, len(payload))
        yield from send_side_message(pool, message, fd, deadline, sent=False)
    finally:
        pool.close_fd(fd)


def send_side_message(
    pool: PipePool, message: bytes, fd: int, deadline: float, *, sent: bool
) -> Step[None]:
    """Send ``fd`` to the writer with ``message`` on the side socket.

    The socket holds a few datagrams (net.unix.max_dgram_qlen, 10 by
    default) until the writer reads them: a burst of new pipes while the
    writer is busy fills it, and this waits for room like a full queue.
    """
    sock = pool.registration
    while True:
        try:
            socket.send_fds(sock, [message], [fd])
            return
        except BlockingIOError:
            pass
        except OSError:
            # EPIPE, ECONNREFUSED, ENOTCONN, EBADF (closed): nobody will read it.
            raise pool.unavailable(sent=sent) from None
        if not (yield (sock.fileno(), WRITE, deadline)):
            if sent:
                raise Timeout("no writer took over within the timeout; the outcome is unknown")
            raise QueueFull("the writer's side socket stayed full past the timeout; not sent")


# -- streamed executemany ------------------------------------------------------


def new_request_file(pool: PipePool) -> int:
    """An anonymous file for a payload to hand over, known to the pool's fork hygiene."""
    fd = os.memfd_create("mpwriter-request", os.MFD_CLOEXEC)
    pool.local.fds.add(fd)  # a child forked meanwhile closes its copy
    return fd


def request_streamed(
    pool: PipePool, request_fd: int, kind: Kind, fd: int, length: int, deadline: float
) -> Step[Any]:
    """A request whose rows were streamed into ``fd`` (`write_rows`, `finish_rows`).

    Hands the file over (this step owns ``fd`` from here and closes it), then
    one empty frame flagged `HANDED_OVER` and `STREAMED`, then waits for the
    reply, as `request` does.
    """
    local = pool.local
    try:
        try:
            slot = local.free.pop()  # atomic: another thread may take the last pipe
        except IndexError:
            slot = yield from new_slot(pool, deadline)
        try:
            request_id = pool.next_request_id()
            message = PAYLOAD_HANDOVER.pack(PAYLOAD_TAG, local.sender, request_id, length)
            yield from send_side_message(pool, message, fd, deadline, sent=False)
            pool.close_fd(fd)
            fd = -1
            flags = WHOLE | HANDED_OVER | STREAMED
            frame = encode_frame(
                kind, flags, local.sender, request_id, slot.number, b"", pool.frame_key
            )
            yield from write_frames(pool, request_fd, (frame,), deadline)
            reply = yield from receive(pool, slot, request_id, deadline)
        except BaseException:
            pool.retire(slot)  # a reply may still come into it
            raise
    finally:
        if fd >= 0:
            pool.close_fd(fd)
    local.free.append(slot)
    return unpack_reply(reply)
