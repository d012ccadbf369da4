"""The asyncio driver: runs a protocol generator (`calls`) on the event loop.

Each wait becomes a future resolved by the loop's own readiness callbacks
(``add_reader`` / ``add_writer``) or by a timer at the wait's deadline; the
loop is never blocked, the side socket included. A loop keeps ONE callback
per descriptor and direction, so many tasks waiting on the same descriptor
(the shared request pipe when the queue is full, the side socket) share one
`_Waiters` entry: the callback wakes all of them, and each one tries again
(whoever finds no room waits anew). The callback is removed once nobody waits.

A cancelled task closes its generator, which retires its reply pipe -- after
its callback was removed, so the loop never watches a closed descriptor.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from .calls import READ, Step, Wait

T = TypeVar("T")


async def run(step: Step[T]) -> T:
    """Run ``step`` to its end on the running loop; return its result or raise its error."""
    waiters = _waiters_of(asyncio.get_running_loop())
    try:
        wait = next(step)
        while True:
            wait = step.send(await waiters.wait(wait))
    except StopIteration as done:
        result: T = done.value
        return result
    except BaseException:
        step.close()  # cancelled: retire the slot; a no-op if the generator raised
        raise


class _Waiters:
    """The tasks of one loop waiting on each descriptor, by direction."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._readers: dict[int, list[asyncio.Future[bool]]] = {}
        self._writers: dict[int, list[asyncio.Future[bool]]] = {}

    async def wait(self, wait: Wait) -> bool:
        """True once the descriptor is ready, False at the deadline."""
        fd, events, deadline = wait
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        loop = self._loop
        reading = events == READ
        table = self._readers if reading else self._writers
        ready: asyncio.Future[bool] = loop.create_future()
        waiting = table.get(fd)
        if waiting is None:
            waiting = table[fd] = []
            watch: Callable[..., Any] = loop.add_reader if reading else loop.add_writer
            watch(fd, self._wake_all, fd, reading)
        waiting.append(ready)
        timer = loop.call_later(remaining, _expire, ready)
        try:
            return await ready
        finally:
            timer.cancel()
            waiting = table.get(fd)
            if waiting is not None and ready in waiting:
                waiting.remove(ready)
                if not waiting:
                    self._unwatch(fd, reading)

    def _wake_all(self, fd: int, reading: bool) -> None:
        waiting = (self._readers if reading else self._writers).get(fd)
        if waiting is None:
            return
        self._unwatch(fd, reading)
        for ready in waiting:
            if not ready.done():
                ready.set_result(True)

    def _unwatch(self, fd: int, reading: bool) -> None:
        if reading:
            del self._readers[fd]
            self._loop.remove_reader(fd)
        else:
            del self._writers[fd]
            self._loop.remove_writer(fd)


def _expire(ready: asyncio.Future[bool]) -> None:
    if not ready.done():
        ready.set_result(False)


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waiters] = (
    weakref.WeakKeyDictionary()
)


def _waiters_of(loop: asyncio.AbstractEventLoop) -> _Waiters:
    waiters = _by_loop.get(loop)
    if waiters is None:
        waiters = _by_loop[loop] = _Waiters(loop)
    return waiters
