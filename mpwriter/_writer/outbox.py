"""The writer's outbox: routes each reply to the reply pipe its request named.

    loop (a batch answered), sessions, inbox (lost requests)
        -->  `Outbox.send` / `send_all`  -->  the pipe registered for (sender, slot)

It only routes replies: the pipes themselves come in through the inbox
(`Inbox` reads the side socket and files each one here with `register`).
It calls nothing upstream; what it cannot route now it keeps, as data, for
whoever holds the inbox to settle (`unrouted`).

Invariants:

- A slot has at most one request in flight: its caller sends the next one
  only after the reply to the last, or after retiring the pipe. So a reply
  is routed by its slot alone.
- Replies never block the writer: every pipe is non-blocking; what a full
  pipe cannot take waits in `_unsent` (later replies to it queue behind, in
  order) and goes out when poll says the pipe is writable (`flush`). A caller
  that stopped reading costs its own pipe only.
- A reply whose slot has no pipe here is `unrouted` until the side socket was
  read (its registration is sent before the request, so it is queued there
  already -- unless the pipe was registered with a writer that has died
  since). Still without a pipe then, it is an orphan: kept (bounded) for a
  caller that re-registers the slot after a restart, and sent on arrival if
  the new pipe awaits it (`register`).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections import OrderedDict, deque
from typing import Any

from .._wire.frames import NO_REPLY, Request

log = logging.getLogger("mpwriter")

# Replies whose pipe is not registered yet, kept for a sender that will
# re-register after a restart; bounded in count and in bytes, oldest dropped
# first (counted in stats()).
_ORPHAN_REPLIES_MAX = 4096
_ORPHAN_BYTES_MAX = 64 << 20

Key = tuple[int, int]  # (sender token, slot)


class Outbox:
    """Writes replies to the pipes registered here; never blocks."""

    def __init__(self, poller: select.poll, orphan_bytes_max: int = _ORPHAN_BYTES_MAX) -> None:
        """``poller`` is the writer's poll object: a pipe with unsent bytes is
        registered on it for POLLOUT, and the writer calls `flush` with a
        descriptor it reports that is none of its own."""
        self._poller = poller
        self._slots: dict[Key, int] = {}
        # Replies whose slot had no pipe: see the module docstring.
        self.unrouted: list[tuple[Request, bytes]] = []
        self._orphans: OrderedDict[Key, tuple[int, bytes]] = OrderedDict()
        self._orphan_bytes = 0
        self._orphan_bytes_max = orphan_bytes_max
        self.dropped_orphans = 0
        self.dropped_orphan_bytes = 0
        # fd -> (its slot, the reply bytes the pipe could not take yet, as
        # views: a large reply is written on from an offset, never re-copied)
        self._unsent: dict[int, tuple[Key, deque[memoryview]]] = {}

    def add_figures(self, figures: dict[str, Any]) -> None:
        """Its figures for `stats()`: the pipes held, the orphans dropped."""
        figures["reply_pipes"] = len(self._slots)
        figures["dropped_orphan_replies"] = self.dropped_orphans
        figures["dropped_orphan_reply_bytes"] = self.dropped_orphan_bytes

    def pipe_of(self, key: Key) -> int | None:
        """The write end of this slot's pipe, if registered here."""
        return self._slots.get(key)

    def descriptors(self) -> list[int]:
        """Every reply pipe held here."""
        return list(self._slots.values())

    # -- pipes, as the inbox brings them -------------------------------------------

    def register(self, key: Key, fd: int, awaiting: int) -> bool:
        """File ``fd`` as this slot's pipe, replacing any other.

        ``awaiting``: the request id the caller awaits on this pipe after a
        restart, or 0 for a fresh pipe (whatever an older pipe under this
        slot awaited was given up, and is not answered on this one). Returns
        True if the awaited reply was kept here as an orphan and is now sent.
        """
        os.set_blocking(fd, False)
        old = self._slots.pop(key, None)
        if old is not None:
            self._drop_fd(old)
        self._slots[key] = fd
        orphan = self._pop_orphan(key)
        if awaiting and orphan is not None and orphan[0] == awaiting:
            self._write_reply(key, fd, orphan[1])
            return True
        return False

    def drop_broken(self) -> list[Key]:
        """Drop the pipes whose reader is gone; return their slots."""
        if not self._slots:
            return []
        poller = select.poll()
        by_fd = {}
        for key, fd in self._slots.items():
            poller.register(fd, 0)  # POLLERR is reported whatever the mask
            by_fd[fd] = key
        gone = []
        for fd, events in poller.poll(0):
            if events & (select.POLLERR | select.POLLNVAL):
                gone.append(by_fd[fd])
                self._slots.pop(by_fd[fd], None)
                self._drop_fd(fd)
        return gone

    # -- orphans ------------------------------------------------------------------

    def _pop_orphan(self, key: Key) -> tuple[int, bytes] | None:
        orphan = self._orphans.pop(key, None)
        if orphan is not None:
            self._orphan_bytes -= len(orphan[1])
        return orphan

    def _keep_orphan(self, key: Key, request_id: int, reply: bytes) -> None:
        self._pop_orphan(key)
        self._orphans[key] = (request_id, reply)
        self._orphan_bytes += len(reply)
        while self._orphans and (
            len(self._orphans) > _ORPHAN_REPLIES_MAX or self._orphan_bytes > self._orphan_bytes_max
        ):
            _, (_, dropped) = self._orphans.popitem(last=False)
            self._orphan_bytes -= len(dropped)
            self.dropped_orphans += 1
            self.dropped_orphan_bytes += len(dropped)

    def route_unrouted(self) -> None:
        """Send the `unrouted` replies whose pipe is registered now; keep the
        others as orphans. Called once the side socket was read."""
        unrouted, self.unrouted = self.unrouted, []
        for request, reply in unrouted:
            key = (request.sender, request.slot)
            if key in self._slots:
                self.send(request, reply)
            else:
                self._keep_orphan(key, request.request_id, reply)

    # -- writing replies --------------------------------------------------------

    def send(self, request: Request, reply: bytes) -> None:
        """Write (or queue) ``reply`` to the pipe ``request`` named; never blocks.

        Without a pipe for its slot, it waits in `unrouted`.
        """
        if request.slot == NO_REPLY:
            return
        key = (request.sender, request.slot)
        fd = self._slots.get(key)
        if fd is None:
            self.unrouted.append((request, reply))
            return
        if self._unsent:
            unsent = self._unsent.get(fd)
            if unsent is not None:
                unsent[1].append(memoryview(reply))
                return
        self._write_reply(key, fd, reply)

    def send_all(self, replies: list[tuple[Request, bytes]]) -> None:
        """`send` each reply, in order: a batch's replies, one call for them all.

        The usual reply -- to a registered pipe with nothing unsent before
        it, taken whole -- is written here; any other goes through `send`.
        """
        slots = self._slots
        write = os.write
        for request, reply in replies:
            fd = slots.get((request.sender, request.slot))
            if fd is None or self._unsent:
                self.send(request, reply)  # not registered yet, no reply wanted, or a queue
                continue
            try:
                written = write(fd, reply)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self._pipe_failed((request.sender, request.slot), fd, exc)
                continue
            if written < len(reply):
                self._keep_rest((request.sender, request.slot), fd, reply, written)

    def send_if_registered(self, key: Key, reply: bytes) -> None:
        """Write ``reply`` to this slot's pipe if one is registered; else drop it
        (its caller is gone: the reply has nobody to reach)."""
        fd = self._slots.get(key)
        if fd is not None:
            self._write_reply(key, fd, reply)

    def _write_reply(self, key: Key, fd: int, data: bytes) -> None:
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._pipe_failed(key, fd, exc)
            return
        if written < len(data):
            self._keep_rest(key, fd, data, written)

    def _keep_rest(self, key: Key, fd: int, data: bytes, written: int) -> None:
        """Keep what a full pipe did not take, to write once poll says it can (`flush`)."""
        self._unsent[fd] = (key, deque((memoryview(data)[written:],)))
        self._poller.register(fd, select.POLLOUT)

    def _pipe_failed(self, key: Key, fd: int, exc: OSError) -> None:
        if exc.errno not in (errno.EPIPE, errno.EBADF):
            log.warning("mpwriter: reply pipe failed: %s", exc)
        # The caller is gone (killed, or retired the pipe after a timeout).
        self._slots.pop(key, None)
        self._drop_fd(fd)

    def flush(self, fd: int) -> bool:
        """Write what ``fd`` could not take before; poll said it is writable.

        Returns True if anything was written (or the pipe was found broken);
        False too for a descriptor with nothing unsent.
        """
        entry = self._unsent.get(fd)
        if entry is None:
            return False
        key, chunks = entry
        progress = False
        while chunks:
            head = chunks[0]
            try:
                written = os.write(fd, head)
            except BlockingIOError:
                return progress
            except OSError as exc:
                self._pipe_failed(key, fd, exc)
                return True
            progress = True
            if written < len(head):
                chunks[0] = head[written:]  # a view: no copy
                return True
            chunks.popleft()
        del self._unsent[fd]
        self._poller.unregister(fd)
        return True

    def drain(self, reply_timeout: float) -> None:
        """Write every unsent reply before the writer exits.

        Blocks, but a pipe that takes nothing for ``reply_timeout`` seconds
        (its caller stopped reading) is given up, with a warning.
        """
        deadlines = {fd: time.monotonic() + reply_timeout for fd in self._unsent}
        while self._unsent:
            poller = select.poll()
            for fd in self._unsent:
                poller.register(fd, select.POLLOUT)
            now = time.monotonic()
            wait = max(0.0, min(deadlines[fd] for fd in self._unsent) - now)
            for fd, _ in poller.poll(int(wait * 1000) + 1):
                if fd in self._unsent and self.flush(fd):
                    deadlines[fd] = time.monotonic() + reply_timeout
            now = time.monotonic()
            for fd in [fd for fd in self._unsent if deadlines[fd] <= now]:
                key, chunks = self._unsent[fd]
                log.warning(
                    "mpwriter: at shutdown, dropped a %d-byte reply its caller did not read",
                    sum(len(chunk) for chunk in chunks),
                )
                self._slots.pop(key, None)
                self._drop_fd(fd)

    def _drop_fd(self, fd: int) -> None:
        if self._unsent.pop(fd, None) is not None:
            self._poller.unregister(fd)
        os.close(fd)

    def close(self) -> None:
        """Close every pipe held; unsent replies are dropped."""
        for fd in list(self._slots.values()):
            self._drop_fd(fd)
        self._slots.clear()
