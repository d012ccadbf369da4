"""The writer's end of the reply pipes, and of the side socket that brings them.

Callers (any process)  --SCM_RIGHTS-->  side socket  -->  `ReplyPipes`:

- a reply pipe's write end (`PIPE_REGISTRATION`) is filed under its
  ``(sender, slot)``; a request names its pipe by that pair;
- a bulk request's payload, as an anonymous file (`PAYLOAD_HANDOVER`), is kept
  under ``(sender, request id)`` until the writer loop meets its frame and
  takes it: read whole (`take_payload`), or, for a streamed executemany,
  kept open as `StreamedRows` that the engine reads a chunk at a time
  (`take_streamed`) until the loop has answered it (`release_streamed`).

Every descriptor that arrives on the side socket is owned here, and closed
here: when replaced, when its caller is gone, when taken, or at shutdown.

Invariants:

- A slot has at most one request in flight: its caller sends the next one
  only after the reply to the last, or after retiring the pipe. So a reply
  is routed by its slot alone, and a slot awaits at most one request.
- A reply is written once per request: by `send` once it has run, or, when
  the writer cannot serve it, by exactly one of the "lost" paths below, each
  of which forgets the request it answers. A request is declared lost only
  by `report_lost`, which the loop calls between chunks of frames, never in
  the middle of one: a registration read mid-chunk (a handed-over frame
  reads the side socket) would otherwise count as read a request that comes
  later in that chunk, which would then be served and answered twice.
- Replies never block the writer: every pipe is non-blocking; what a full
  pipe cannot take waits in `_unsent` (later replies to it queue behind, in
  order) and goes out when poll says the pipe is writable (`flush`). A caller
  that stopped reading costs its own pipe only.

Restarts (see also `_writer.py`): a caller whose pipe hit EOF re-registers
the slot naming the request it awaits. A reply that was ready before the new
pipe came is an orphan, kept (bounded) and sent on arrival. Otherwise, if the
request is not queued or in hand, it is awaited until the loop has read every
byte that was queued when the pipe came (`RequestStream`); past that offset it
was taken by the writer that died, and the caller is told the outcome is
unknown.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Protocol

from .._errors import QueueFull, WriterCrashed
from .._wire.frames import (
    NO_REPLY,
    PAYLOAD_HANDOVER,
    PAYLOAD_TAG,
    PIPE_REGISTRATION,
    PIPE_TAG,
    SIDE_MESSAGE_MAX,
    Request,
    sender_pid,
)
from .._wire.pids import pid_alive as pid_alive  # the loop's import
from .._wire.streamed import StreamedRows as StreamedRows  # the loop's import
from .._wire.streamed import read_whole
from .batch import Counters, error_reply

log = logging.getLogger("mpwriter")

# Replies whose pipe is not registered yet, kept for a sender that will
# re-register after a restart; bounded in count and in bytes, oldest dropped
# first (counted in stats()).
_ORPHAN_REPLIES_MAX = 4096
_ORPHAN_BYTES_MAX = 64 << 20
# Handed-over payloads waiting for their frame, in bytes (memfd pages): past
# this, the oldest are dropped (their requests answered `QueueFull`, "not
# applied") --
# but never the newest, so that one bulk request of any size still passes.
# Streamed files taken and not yet answered count too (they cannot be
# dropped: their requests are queued), so what is held in files stays
# bounded by this, plus the newest file and those queued here.
_HANDED_OVER_BYTES_MAX = 256 << 20
# The requests whose payload that bound dropped, remembered until their frame
# comes so that they are answered for what happened to them; the oldest are
# forgotten past this many (their sender may be gone).
_SHED_REMEMBERED_MAX = 4096

Key = tuple[int, int]  # (sender token, slot)


class RequestStream(Protocol):
    """What `ReplyPipes` must know of the request pipe, implemented by the loop.

    Enough to tell a request that is still coming from one the dead writer took.
    """

    @property
    def consumed(self) -> int:
        """Bytes read from the request pipe so far, by this writer."""
        ...

    def queued_bytes(self) -> int:
        """Bytes in the request pipe, not read yet."""
        ...

    def holds(self, key: Key) -> bool:
        """Whether a request from this slot is queued here or being served."""
        ...


class ReplyPipes:
    """Reads the side socket; writes replies to the pipes it brought."""

    def __init__(
        self,
        side: socket.socket,
        counters: Counters,
        stream: RequestStream,
        watch: Callable[[int], None],
        unwatch: Callable[[int], None],
        orphan_bytes_max: int = _ORPHAN_BYTES_MAX,
        handed_over_bytes_max: int = _HANDED_OVER_BYTES_MAX,
    ) -> None:
        """``watch(fd)`` asks the loop to call `flush` once ``fd`` is writable;
        ``unwatch(fd)`` withdraws that. The two maxima bound what is held, in
        bytes."""
        self._side = side  # kept: collecting the socket would close its descriptor
        side.setblocking(False)
        self._counters = counters
        self._stream = stream
        self._watch = watch
        self._unwatch = unwatch
        self._slots: dict[Key, int] = {}
        # (sender, slot) -> (request id awaited, stream offset it must appear by).
        # Empty but after a restart: the loop tests it before calling `arrived`.
        self.awaited: dict[Key, tuple[int, int]] = {}
        self._orphans: OrderedDict[Key, tuple[int, bytes]] = OrderedDict()
        self._orphan_bytes = 0
        self._orphan_bytes_max = orphan_bytes_max
        self.dropped_orphans = 0
        self.dropped_orphan_bytes = 0
        # (sender, request id) -> (descriptor, length, arrival) of payloads
        # handed over on the side socket, until their frame comes; oldest first
        self._handed_over: dict[tuple[int, int], tuple[int, int, float]] = {}
        self._handed_over_bytes = 0
        self._handed_over_bytes_max = handed_over_bytes_max
        self.dropped_handovers = 0
        self.dropped_handover_bytes = 0
        # (sender, request id) of payloads the bound dropped: `answer_lost`
        self._shed: OrderedDict[tuple[int, int], None] = OrderedDict()
        # descriptor -> length of the streamed files taken and not yet
        # released: still counted in `_handed_over_bytes`
        self._streamed: dict[int, int] = {}
        # fd -> (its slot, the reply bytes the pipe could not take yet, as
        # views: a large reply is written on from an offset, never re-copied)
        self._unsent: dict[int, tuple[Key, deque[memoryview]]] = {}

    @property
    def pipe_count(self) -> int:
        return len(self._slots)

    def pipe_of(self, key: Key) -> int | None:
        """The write end of this slot's pipe, if held (an interactive session watches it).

        None once its caller is gone (or retired it). As in `send`, the
        registration may still be queued on the side socket: it is read first.
        """
        fd = self._slots.get(key)
        if fd is None:
            self.read_side_socket()
            fd = self._slots.get(key)
        return fd

    def descriptors(self) -> list[int]:
        """Every descriptor held here: the side socket, reply pipes, payload files."""
        return [
            self._side.fileno(),
            *self._slots.values(),
            *(fd for fd, _, _ in self._handed_over.values()),
            *self._streamed,
        ]

    # -- the side socket --------------------------------------------------------

    def read_side_socket(self) -> None:
        """Take the reply pipes and handed-over payloads waiting on the side socket."""
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._side, SIDE_MESSAGE_MAX, 1)
            except BlockingIOError:
                return
            tag = message[0] if message and len(fds) == 1 else None
            if tag == PIPE_TAG and len(message) == PIPE_REGISTRATION.size:
                _, sender, slot, awaiting = PIPE_REGISTRATION.unpack(message)
                self._register_pipe((sender, slot), fds[0], awaiting)
            elif tag == PAYLOAD_TAG and len(message) == PAYLOAD_HANDOVER.size:
                _, sender, request_id, length = PAYLOAD_HANDOVER.unpack(message)
                self._hold_payload((sender, request_id), fds[0], length)
            else:
                for fd in fds:
                    os.close(fd)

    def _hold_payload(self, key: tuple[int, int], fd: int, length: int) -> None:
        old = self._handed_over.pop(key, None)
        if old is not None:
            self._forget_payload(old, dropped=True)
        self._handed_over[key] = (fd, length, time.monotonic())
        self._handed_over_bytes += length
        while self._handed_over_bytes > self._handed_over_bytes_max and len(self._handed_over) > 1:
            oldest = next(iter(self._handed_over))
            self._forget_payload(self._handed_over.pop(oldest), dropped=True)
            self._shed[oldest] = None
            if len(self._shed) > _SHED_REMEMBERED_MAX:
                self._shed.popitem(last=False)

    def _forget_payload(self, entry: tuple[int, int, float], *, dropped: bool) -> None:
        fd, length, _ = entry
        os.close(fd)
        self._handed_over_bytes -= length
        if dropped:
            self.dropped_handovers += 1
            self.dropped_handover_bytes += length

    def _take_entry(self, sender: int, request_id: int) -> tuple[int, int, float] | None:
        """The held hand-over of this request, no longer held; None if none came."""
        key = (sender, request_id)
        entry = self._handed_over.pop(key, None)
        if entry is None:
            self.read_side_socket()  # sent before the frame: queued there
            entry = self._handed_over.pop(key, None)
        return entry

    def take_payload(self, sender: int, request_id: int) -> bytes | None:
        """The payload handed over for this request, whole; None if lost or cut short.

        On None the request never ran; the caller answers it with `answer_lost`.
        """
        entry = self._take_entry(sender, request_id)
        if entry is None:
            return None
        fd, length, _ = entry
        try:
            payload = read_whole(fd, length)
        finally:
            self._forget_payload(entry, dropped=False)
        return payload if len(payload) == length else None

    def take_streamed(self, sender: int, request_id: int) -> StreamedRows | None:
        """The rows streamed into the file handed over for this request; None if
        lost, cut short or malformed (the request never ran: `answer_lost`).

        The file stays open, and counted against the bound of what is held,
        until `release_streamed`.
        """
        entry = self._take_entry(sender, request_id)
        if entry is None:
            return None
        fd, length, _ = entry
        try:
            rows = StreamedRows(fd, length)
        except (OSError, ValueError):
            self._forget_payload(entry, dropped=False)
            return None
        self._streamed[fd] = length
        return rows

    def release_streamed(self, rows: StreamedRows) -> None:
        """Close a file `take_streamed` gave out; its request was answered."""
        length = self._streamed.pop(rows.fd, None)
        if length is not None:
            os.close(rows.fd)
            self._handed_over_bytes -= length

    def _register_pipe(self, key: Key, fd: int, awaiting: int) -> None:
        os.set_blocking(fd, False)
        old = self._slots.pop(key, None)
        if old is not None:
            self._drop_fd(old)
        self._slots[key] = fd
        if awaiting:
            self._await_after_restart(key, awaiting)
        else:
            # A fresh pipe: whatever an older pipe under this number awaited
            # was given up by its caller, and must not be answered on this one.
            self.awaited.pop(key, None)
            self._pop_orphan(key)

    # -- restarts ---------------------------------------------------------------

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

    def _await_after_restart(self, key: Key, request_id: int) -> None:
        orphan = self._pop_orphan(key)
        if orphan is not None and orphan[0] == request_id:
            self._write_reply(key, self._slots[key], orphan[1])
            return
        if self._stream.holds(key):
            return  # taken or queued here already: its reply will find the new pipe
        # Everything the caller sent before it registered this pipe is in the
        # pipe now, or was taken by the writer that died.
        # Declared lost by the loop's next `report_lost`.
        self.awaited[key] = (request_id, self._stream.consumed + self._stream.queued_bytes())

    def arrived(self, request: Request) -> None:
        """A request was read: if its slot awaited it, it is no longer lost."""
        awaited = self.awaited.get((request.sender, request.slot))
        if awaited is not None and awaited[0] == request.request_id:
            del self.awaited[(request.sender, request.slot)]

    def report_lost(self) -> None:
        """Answer each awaited request the stream has been read past: the dead writer took it.

        Only between chunks of frames: every request read so far is queued.
        """
        consumed = self._stream.consumed
        for key, (request_id, offset) in list(self.awaited.items()):
            if consumed >= offset:
                del self.awaited[key]
                self._counters.lost_requests += 1
                fd = self._slots.get(key)
                if fd is None:
                    continue  # its caller is gone too (its pipe failed)
                lost = WriterCrashed(
                    "the writer process died after taking this request; the outcome is unknown"
                )
                self._write_reply(key, fd, error_reply(request_id, lost))

    def answer_lost(self, request: Request) -> None:
        """Answer a request whose handed-over payload is gone: it never ran.

        Its payload was dropped by the bound on what is held (`QueueFull`),
        or a writer that died had taken it (`WriterCrashed`). Answered here,
        so nothing else may answer it: it is no longer awaited.
        """
        self.awaited.pop((request.sender, request.slot), None)
        error: BaseException
        shed = (request.sender, request.request_id)
        if shed in self._shed:
            del self._shed[shed]
            error = QueueFull(
                "the writer held more bulk payloads waiting to be served than its bound"
                f" ({self._handed_over_bytes_max >> 20} MiB) and dropped this one, the"
                " oldest; not applied"
            )
            self._counters.count_error(error)
        else:
            self._counters.lost_requests += 1
            error = WriterCrashed(
                "the writer process died while receiving this request; it was not applied"
            )
        self.send(request, error_reply(request.request_id, error))

    # -- writing replies --------------------------------------------------------

    def send(self, request: Request, reply: bytes) -> None:
        """Write (or queue) ``reply`` to the pipe ``request`` named; never blocks."""
        if request.slot == NO_REPLY:
            return
        key = (request.sender, request.slot)
        fd = self._slots.get(key)
        if fd is None:
            # The registration is sent before the request, so it is queued
            # on the socket already -- unless the pipe was registered with a
            # writer that has died since, and its sender has not noticed yet.
            self.read_side_socket()
            fd = self._slots.get(key)
            if fd is None:
                self._keep_orphan(key, request.request_id, reply)
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
        self._watch(fd)

    def _pipe_failed(self, key: Key, fd: int, exc: OSError) -> None:
        if exc.errno not in (errno.EPIPE, errno.EBADF):
            log.warning("mpwriter: reply pipe failed: %s", exc)
        # The caller is gone (killed, or retired the pipe after a timeout).
        self._slots.pop(key, None)
        self._drop_fd(fd)

    def flush(self, fd: int) -> bool:
        """Write what ``fd`` could not take before; poll said it is writable.

        Returns True if anything was written (or the pipe was found broken).
        """
        key, chunks = self._unsent[fd]
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
        self._unwatch(fd)
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
            self._unwatch(fd)
        os.close(fd)

    # -- housekeeping -----------------------------------------------------------

    def housekeeping(self, stale: float) -> None:
        """Drop the pipes whose reader is gone, and payloads older than ``stale``
        (a monotonic time) or whose sender is dead."""
        self.read_side_socket()
        if self._slots:
            poller = select.poll()
            by_fd = {}
            for key, fd in self._slots.items():
                poller.register(fd, 0)  # POLLERR is reported whatever the mask
                by_fd[fd] = key
            for fd, events in poller.poll(0):
                if events & (select.POLLERR | select.POLLNVAL):
                    self._slots.pop(by_fd[fd], None)
                    self.awaited.pop(by_fd[fd], None)
                    self._drop_fd(fd)
        for key, (_, _, arrived) in list(self._handed_over.items()):
            if arrived < stale or not pid_alive(sender_pid(key[0])):
                self._forget_payload(self._handed_over.pop(key), dropped=True)
        if self.awaited:
            self.report_lost()

    def close(self) -> None:
        """Close every descriptor held; unsent replies are dropped."""
        for fd in list(self._slots.values()):
            self._drop_fd(fd)
        self._slots.clear()
        for entry in self._handed_over.values():
            self._forget_payload(entry, dropped=False)
        self._handed_over.clear()
        for fd in self._streamed:
            os.close(fd)
        self._streamed.clear()
