"""The futures driver: one collector thread per handle runs the protocol
generators (`calls`) of every pending future at once.

`Writer.submit` and friends send their request in the caller's thread (see
`blocking.run_until_sent`) and hand the generator over here at its first
readable wait. The collector polls the waits of all its generators together
-- reply pipes and, after a writer restart, the side socket -- and resumes
each one whose descriptor is ready or whose deadline passed. A generator only
ever does non-blocking I/O between two waits, so no future holds up another:
the thread never blocks in any single wait.

Lifetime: the thread starts with the handle's first future and stops when the
handle is closed or collected (`stop`, which fails what is still pending with
`WriterClosed`, closes the generators -- retiring their pipes -- and closes
the wake-up pipe). A forked child never has it: the pool's per-process state
is replaced there, and the parent's descriptors closed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import testing
from .._errors import Error, WriterClosed
from .._wire.replies import millis
from . import blocking
from .calls import Step, Wait
from .pipe_pool import PipePool

log = logging.getLogger("mpwriter")

_STOP_GRACE = 5.0  # seconds `stop` waits for the thread, which never blocks for long
_IDLE_WAIT = 60.0  # seconds the thread sleeps with nothing pending (a wake-up ends it)


class Pending:
    """A submitted request: its generator, what it waits for, and its future."""

    __slots__ = ("convert", "future", "step", "wait")

    def __init__(
        self,
        step: Step[Any],
        wait: Wait,
        future: concurrent.futures.Future[Any],
        convert: Callable[[Any], Any],
    ) -> None:
        self.step = step
        self.wait = wait
        self.future = future
        self.convert = convert


class Collector:
    """The thread that resolves the futures of one handle in one process.

    Should the thread itself ever fail, it fails every future it holds (no
    future is left unresolved) and marks itself ``broken``; `add` then
    refuses, and the handle starts a new collector.
    """

    def __init__(self, fds: set[int]) -> None:
        # ``fds``: the process's registry of descriptors (closed in a forked child).
        self._fds = fds
        self._lock = threading.Lock()
        self._added: list[Pending] = []
        self.broken = False
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        fds.update((self._wake_r, self._wake_w))
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="mpwriter-replies", daemon=True)
        self._thread.start()

    def add(self, pending: Pending) -> bool:
        """Hand over a future to resolve; False if this collector is broken or stopped."""
        with self._lock:
            if self.broken or self._stopping:
                return False
            self._added.append(pending)
            self._wake()
        return True

    def stop(self) -> None:
        """Fail what is pending with `WriterClosed`, end the thread, close its pipe.

        Waits for the thread unless called from it (a future's callback).
        """
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            if not self.broken:
                self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(_STOP_GRACE)

    def _wake(self) -> None:
        # Under the lock: the thread closes this pipe under it when it ends.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        pending: list[Pending] = []
        try:
            self._collect(pending)
        except BaseException as exc:
            log.exception("mpwriter: the thread resolving submit() futures failed")
            cause = exc  # ``exc`` is unbound after this block; the closure outlives it

            def failure() -> BaseException:
                error = Error(f"the thread collecting replies failed ({cause!r}); outcome unknown")
                error.__cause__ = cause
                return error

            self._end(pending, failure, broken=True)

    def _collect(self, pending: list[Pending]) -> None:
        while True:
            with self._lock:
                added, self._added = self._added, []
                stopping = self._stopping
            pending.extend(added)
            if stopping:
                self._end(pending, _closed, broken=False)
                return
            events: dict[int, int] = {self._wake_r: select.POLLIN}
            for entry in pending:
                fd, mask, _ = entry.wait
                events[fd] = events.get(fd, 0) | mask
            poller = select.poll()
            for fd, mask in events.items():
                poller.register(fd, mask)
            now = time.monotonic()
            soonest = min((entry.wait[2] for entry in pending), default=now + _IDLE_WAIT)
            ready = dict(poller.poll(millis(max(0.0, soonest - now))))
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            now = time.monotonic()
            still: list[Pending] = []
            for entry in pending:
                fd, mask, deadline = entry.wait
                # POLLHUP and POLLERR come whatever was asked: the step finds out what.
                if ready.get(fd, 0) & (mask | select.POLLHUP | select.POLLERR):
                    resumed = self._resume(entry, True)
                elif deadline <= now:
                    resumed = self._resume(entry, False)
                else:
                    resumed = True
                if resumed:
                    still.append(entry)
            pending[:] = still

    def _resume(self, entry: Pending, ready: bool) -> bool:
        """Send ``ready`` to the entry's generator; False once its future is resolved."""
        if testing.faults.collector_fails:
            raise RuntimeError("injected collector fault (mpwriter.testing)")
        try:
            entry.wait = entry.step.send(ready)
            return True
        except StopIteration as done:
            try:
                entry.future.set_result(entry.convert(done.value))
            except BaseException as exc:
                entry.future.set_exception(exc)
        except BaseException as exc:
            entry.future.set_exception(exc)
        return False

    def _end(
        self, pending: list[Pending], outcome: Callable[[], BaseException], *, broken: bool
    ) -> None:
        with self._lock:
            self.broken = self.broken or broken
            self._stopping = True
            orphans = pending + self._added
            pending.clear()
            self._added = []
            for fd in (self._wake_r, self._wake_w):
                self._fds.discard(fd)
                os.close(fd)
        for entry in orphans:
            entry.step.close()  # retires its pipe: a reply may still come
            if not entry.future.done():
                entry.future.set_exception(outcome())


def submit(
    pool: PipePool, step: Step[Any], convert: Callable[[Any], Any]
) -> concurrent.futures.Future[Any]:
    """Send ``step``'s request here, in the caller's thread (so its requests
    stay in order), and hand the rest to the collector of ``pool``'s process;
    the future resolves to ``convert`` of its reply."""
    wait = blocking.run_until_sent(step)
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    pending = Pending(step, wait, future, convert)
    while not _collector(pool).add(pending):
        if pool.closed:
            step.close()
            future.set_exception(pool.unavailable(sent=True))
            break
        # That collector broke (and logged why): the next turn starts a new one.
    return future


def _collector(pool: PipePool) -> Collector:
    """The collector of ``pool`` in this process: the current one, or a new one if it broke."""
    local = pool.local
    with local.lock:
        current = local.collector
        if isinstance(current, Collector) and not current.broken:
            return current
        fresh = Collector(local.fds)
        local.collector = fresh
        return fresh


def _closed() -> WriterClosed:
    return WriterClosed("this Writer handle was closed; the outcome is unknown")
