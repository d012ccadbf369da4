"""`Writer.submit`: futures resolved by one collector thread per process.

No thread per request: the collector polls the reply pipes of every pending
future at once and reads each ready one without blocking.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING

from .._errors import Error
from .._wire.replies import Incoming, Result, millis, no_reply, unpack_reply

if TYPE_CHECKING:
    from .handle import Writer
    from .pipe_pool import Slot

log = logging.getLogger("mpwriter")


class Pending:
    """A submitted request whose reply the collector awaits."""

    __slots__ = ("deadline", "future", "incoming", "request_id", "slot")

    def __init__(
        self,
        slot: Slot,
        request_id: int,
        future: concurrent.futures.Future[Result],
        deadline: float,
    ) -> None:
        self.slot = slot
        self.request_id = request_id
        self.future = future
        self.deadline = deadline
        self.incoming = Incoming(request_id)


class Collector:
    """One thread per process that resolves the futures of `Writer.submit`.

    It never blocks on one reply: each ready pipe is read once, without
    waiting, so a slow or lost writer delays no other future past its deadline.
    Should the thread itself ever fail, it fails every future it holds (no
    future is left unresolved) and marks itself ``broken``; `add` then
    refuses, and the handle starts a new collector.
    """

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self._lock = threading.Lock()
        self._added: list[Pending] = []
        self.broken = False
        self._wake_r, self._wake_w = os.pipe()
        # Closed in a forked child with the rest of this process's descriptors.
        writer._local.fds.update((self._wake_r, self._wake_w))
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        thread = threading.Thread(target=self._run, name="mpwriter-replies", daemon=True)
        thread.start()

    def add(self, pending: Pending) -> bool:
        """Hand over a future to resolve; False if this collector is broken."""
        with self._lock:
            if self.broken:
                return False
            self._added.append(pending)
            # Under the lock: a broken collector closes this pipe under it too.
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")
        return True

    def _run(self) -> None:
        pending: dict[int, Pending] = {}  # by the fd of its reply pipe
        try:
            self._collect(pending)
        except BaseException as exc:
            log.exception("mpwriter: the thread resolving submit() futures failed")
            with self._lock:
                self.broken = True
                orphans = list(pending.values()) + self._added
                self._added = []
                self._writer._close_fd(self._wake_r)
                self._writer._close_fd(self._wake_w)
            for entry in orphans:
                self._writer._retire(entry.slot)
                failure = Error(f"the thread collecting replies failed ({exc!r}); outcome unknown")
                failure.__cause__ = exc
                entry.future.set_exception(failure)

    def _collect(self, pending: dict[int, Pending]) -> None:
        while True:
            with self._lock:
                added, self._added = self._added, []
            pending.update((entry.slot.fd, entry) for entry in added)
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in pending:
                poller.register(fd, select.POLLIN)
            now = time.monotonic()
            soonest = min((entry.deadline for entry in pending.values()), default=now + 60.0)
            ready = {fd for fd, _ in poller.poll(millis(max(0.0, soonest - now)))}
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            now = time.monotonic()
            for fd, entry in list(pending.items()):
                if fd in ready:
                    resolved = self._step(entry)  # if this raises, _run fails the entry
                    del pending[fd]
                    if not resolved:
                        pending[entry.slot.fd] = entry  # maybe a new pipe, after a restart
                elif entry.deadline <= now:
                    del pending[fd]
                    self._writer._retire(entry.slot)
                    entry.future.set_exception(no_reply())

    def _step(self, entry: Pending) -> bool:
        """Read what is ready for ``entry``; True once its future is resolved."""
        writer = self._writer
        try:
            reply = writer._receive(entry.slot, entry.incoming, entry.request_id, entry.deadline)
        except BaseException as exc:
            writer._retire(entry.slot)
            entry.future.set_exception(exc)
            return True
        if reply is None:
            return False
        writer._local.free.append(entry.slot)
        try:
            entry.future.set_result(Result(*unpack_reply(reply)))
        except BaseException as exc:
            entry.future.set_exception(exc)
        return True
