"""asyncio: await a write without a thread per call and without blocking the loop.

The request path is the synchronous one's, with each wait handed to the event
loop: a full queue is awaited with ``loop.add_writer`` on the request pipe,
the reply with ``loop.add_reader`` on the request's own reply pipe. A call
that times out or is cancelled retires its reply pipe, like a synchronous one.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from .._wire.frames import Kind
from .._wire.replies import Incoming, no_reply, queue_full, unpack_reply

if TYPE_CHECKING:
    from .handle import Writer


async def request(writer: Writer, kind: Kind, body: tuple[Any, ...], timeout: float | None) -> Any:
    """Send one request and await its reply; the async twin of `Writer._call`."""
    deadline, payload = writer._prepare(kind, body, timeout)
    slot = writer._borrow_slot(deadline)
    loop = asyncio.get_running_loop()
    try:
        outgoing = writer._outgoing(kind, payload, slot.number, deadline)
        while not outgoing.pump():
            if not await _ready(loop, writer._request_fd, deadline, writable=True):
                raise queue_full()
        incoming = Incoming(outgoing.request_id)
        while True:
            if not await _ready(loop, slot.fd, deadline, writable=False):
                raise no_reply()
            reply = writer._receive(slot, incoming, outgoing.request_id, deadline)
            if reply is not None:
                break
    except BaseException:
        # Cancelled or failed: a reply may still arrive on this pipe later.
        writer._retire(slot)
        raise
    writer._local.free.append(slot)
    return unpack_reply(reply)


async def _ready(
    loop: asyncio.AbstractEventLoop, fd: int, deadline: float, *, writable: bool
) -> bool:
    """Wait until ``fd`` is ready (True) or ``deadline`` passes (False)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    ready: asyncio.Future[bool] = loop.create_future()

    def wake(fd_ready: bool) -> None:
        if not ready.done():
            ready.set_result(fd_ready)

    watch, unwatch = (
        (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    )
    watch(fd, wake, True)
    timer = loop.call_later(remaining, wake, False)
    try:
        return await ready
    finally:
        unwatch(fd)
        timer.cancel()
