"""The blocking driver: runs a protocol generator (`calls`) in the calling thread.

Each wait is one ``poll`` on the descriptor, bounded by the wait's deadline.
A dead writer needs no second descriptor: it held the only write end of the
reply pipe, so its death shows as EOF (readable) there, and as an error
(writable) on the request pipe once no writer is left to read it.

gevent: ``select.poll`` is looked up at each wait, not bound at import. Under
gevent's monkey-patching (``gevent.monkey.patch_all()``, as gunicorn's gevent
worker does) it is ``gevent.select.poll``, which parks the greenlet and lets
the hub run the others until the descriptor is ready. Every wait of a
blocking call relies on that -- full request queue, full side socket,
reply, re-registration after a restart -- since they are all this one poll;
tests/test_gevent.py checks that each of them lets other greenlets run.
Without gevent nothing changes: it is the ``select.poll`` of the standard
library.
"""

from __future__ import annotations

import os
import select
import time
from typing import Any, TypeVar

from .._wire.frames import MAX_PAYLOAD, REPLY_HEADER, REPLY_HEADER_SIZE, WHOLE, Kind, encode_frame
from .._wire.replies import READ_SIZE, millis, no_reply, unpack_reply
from . import calls
from .calls import READ, Step, Wait
from .pipe_pool import PipePool

T = TypeVar("T")


def run(step: Step[T]) -> T:
    """Run ``step`` to its end in this thread; return its result or raise its error.

    If this thread is interrupted while waiting (KeyboardInterrupt, a
    signal handler that raises), the generator is closed, so it retires
    its slot, and the interruption propagates.
    """
    try:
        fd, events, deadline = next(step)
        while True:
            # The usual wait, for a reply, inlined: no call per wait but poll's.
            if events == READ and _pollers_made_by[0] is select.poll:
                poller = _reply_pollers.get(fd) or _reply_poller(fd)
                remaining = deadline - time.monotonic()
                # millis(remaining), inlined: rounded up, so poll never returns early.
                ready = remaining > 0 and bool(poller.poll(int(remaining * 1000) + 1))
            else:
                ready = _ready(fd, events, deadline)
            fd, events, deadline = step.send(ready)
    except StopIteration as done:
        result: T = done.value
        return result
    except BaseException:
        step.close()  # a no-op if the generator itself raised
        raise


def request(pool: PipePool, request_fd: int, kind: Kind, payload: bytes, deadline: float) -> Any:
    """`calls.request` run to its end in this thread: the decoded reply, or its error.

    The common request -- a free reply pipe, one frame, written at once, the
    reply whole in one read -- runs here as a straight line, with no
    generator: the same steps as `calls.request`, in the same order, with the
    same deadline on its one wait. Anything else goes on in `calls`'s
    generators from where this line left it: no slot free (a new pipe to
    register), a payload of several frames, a full queue, a reply in pieces,
    EOF (the writer died: `calls.after_eof`), gevent's poll.
    """
    local = pool.local
    free = local.free
    if len(payload) > MAX_PAYLOAD or _pollers_made_by[0] is not select.poll:
        return run(calls.request(pool, request_fd, kind, payload, deadline))
    try:
        # Not "if free: pop": the pool is shared by this process's threads,
        # and another may take the last pipe between the test and the pop.
        slot = free.pop()
    except IndexError:
        return run(calls.request(pool, request_fd, kind, payload, deadline))
    try:
        request_id = next(local.request_ids) % 0xFFFFFFFF + 1  # pool.next_request_id()
        frame = encode_frame(
            kind, WHOLE, local.sender, request_id, slot.number, payload, pool.frame_key
        )
        try:
            os.write(request_fd, frame)
        except BlockingIOError:
            run(calls.write_frames(pool, request_fd, (frame,), deadline))
        except BrokenPipeError:
            raise pool.unavailable(sent=False) from None
        fd = slot.fd
        poller = _reply_pollers.get(fd) or _reply_poller(fd)
        remaining = deadline - time.monotonic()
        # millis(remaining), inlined: rounded up, so poll never returns early.
        if remaining <= 0 or not poller.poll(int(remaining * 1000) + 1):
            raise no_reply()
        chunk = os.read(fd, READ_SIZE)
        reply: bytes | bytearray = chunk
        # `replies.read_reply`'s check, inlined: the usual reply is whole, and its own.
        if len(reply) < REPLY_HEADER_SIZE or REPLY_HEADER.unpack_from(reply) != (
            len(reply) - REPLY_HEADER_SIZE,
            request_id,
        ):
            reply = run(calls.receive_rest(pool, slot, request_id, deadline, chunk))
    except BaseException:
        # Whatever went wrong, the pipe may still receive a reply.
        pool.retire(slot)
        raise
    # A whole reply was read: the pipe is clean, even if the reply is an error.
    free.append(slot)
    return unpack_reply(reply)


def run_until_sent(step: Step[T]) -> Wait:
    """Run ``step`` until its request is sent in full; return its first
    readable wait, from where another driver may resume it (`calls` contract)."""
    try:
        wait = next(step)
        while wait[1] != READ:
            wait = step.send(_ready(*wait))
    except BaseException:
        step.close()
        raise
    return wait


def _ready(fd: int, events: int, deadline: float) -> bool:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    if events == READ:
        poller = _reply_poller(fd)
    else:
        # Looked up now, not at import: gevent's poll once monkey-patched (see above).
        poller = select.poll()
        poller.register(fd, events)
    return bool(poller.poll(millis(remaining)))


# A poll object per reply-pipe descriptor number, kept: making and filling one
# per call would be a measurable share of the hot path. Safe to share by number: a poll
# object holds only numbers and passes them to poll(2) on each call, and a
# reply pipe (the only thing waited on for reading) is lent to one request,
# so no two threads poll the same number at once. Dropped whenever
# ``select.poll`` changes, that is once gevent has monkey-patched it.
_reply_pollers: dict[int, Any] = {}
_pollers_made_by: list[Any] = [select.poll]


def _reply_poller(fd: int) -> Any:
    make = select.poll
    if make is not _pollers_made_by[0]:
        _reply_pollers.clear()
        _pollers_made_by[0] = make
    poller = _reply_pollers.get(fd)
    if poller is None:
        poller = _reply_pollers[fd] = make()
        poller.register(fd, READ)
    return poller
