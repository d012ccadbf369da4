"""The writer's inbox: everything that comes in, until the loop takes it.

    callers (any process)
      --frames-->         request pipe  -->  `Inbox.read_available`: frames
                                             reassembled into the `backlog`
      --SCM_RIGHTS-->     side socket   -->  `Inbox.read_side_socket`:
          a reply pipe (`PIPE_REGISTRATION`)  -->  filed in the `Outbox`
          a bulk payload (`PAYLOAD_HANDOVER`)  -->  held in `HandOvers` until
                                                   its frame comes

The loop takes requests from the head of `backlog`, noting each slot it
holds in `in_hand` until the batch is answered. The inbox calls nothing
upstream; downstream, it files pipes with the outbox and answers there the
requests it knows will never run (lost with a dead writer, or shed).

Every descriptor that arrives on the side socket is owned here until it is
handed on: a reply pipe to the outbox at once, a payload file closed when
replaced, taken, released, stale, or at shutdown.

Restarts: a caller whose reply pipe hit EOF (its writer died) registers a
new pipe for the same slot, naming the request it awaits. If that request is
queued or in hand here, it is served and answered on the new pipe. If its
reply was ready before the new pipe came, the outbox kept it and sends it
on arrival. Otherwise it is `awaited` until this writer has read every byte
that was queued when the pipe came; past that offset the dead writer had
taken it, and the caller is told the outcome is unknown.

Invariants:

- A reply is written once per request: by the loop once it has run, or,
  when the writer cannot serve it, by exactly one of the "lost" paths here,
  each of which forgets the request it answers. A request is declared lost
  only by `report_lost`, which runs between chunks of frames, never in the
  middle of one: a registration read mid-chunk (a handed-over frame reads
  the side socket) would otherwise count as read a request that comes later
  in that chunk, which would then be served and answered twice.
- The request pipe is bounded by its kernel capacity plus what is read here
  (`read_limit` requests): a flood of callers blocks in their own process.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import time
from collections import OrderedDict, deque
from multiprocessing.connection import Connection
from typing import Any

from .._errors import QueueFull, WriterCrashed
from .._wire.frames import (
    HANDED_OVER,
    PAYLOAD_HANDOVER,
    PAYLOAD_TAG,
    PIPE_REGISTRATION,
    PIPE_TAG,
    SIDE_MESSAGE_MAX,
    STREAMED,
    WHOLE,
    Assembler,
    Frame,
    FrameReader,
    Request,
    sender_pid,
)
from .._wire.pids import pid_alive
from .._wire.streamed import StreamedRows, read_whole
from .batch import Counters, Work, error_reply
from .outbox import Key, Outbox

_READ_SIZE = 1 << 16
# Handed-over payloads waiting for their frame, in bytes (memfd pages): past
# this, the oldest are dropped (their requests answered `QueueFull`, "not
# applied") -- but never the newest, so that one bulk request of any size
# still passes. Streamed files taken and not yet answered count too (they
# cannot be dropped: their requests are queued), so what is held in files
# stays bounded by this, plus the newest file and those queued here.
_HANDED_OVER_BYTES_MAX = 256 << 20
# The requests whose payload that bound dropped, remembered until their frame
# comes so that they are answered for what happened to them; the oldest are
# forgotten past this many (their sender may be gone).
_SHED_REMEMBERED_MAX = 4096
# tuple.__new__ in C, for the per-request tuples: a NamedTuple's own __new__
# is a Python function, a call more per request.
_new_tuple = tuple.__new__


class HandOvers:
    """Bulk payloads handed over as files, held under (sender, request id).

    A payload waits here until the inbox meets its frame and takes it: read
    whole (`take_payload`), or, for a streamed executemany, kept open as
    `StreamedRows` that the engine reads a chunk at a time (`take_streamed`)
    until its request was answered (`release_streamed`).
    """

    def __init__(self, bytes_max: int) -> None:
        # (sender, request id) -> (descriptor, length, arrival); oldest first
        self._held: dict[tuple[int, int], tuple[int, int, float]] = {}
        self._bytes = 0
        self.bytes_max = bytes_max
        self.dropped = 0
        self.dropped_bytes = 0
        # (sender, request id) of payloads the bound dropped: `Inbox.answer_lost`
        self.shed: OrderedDict[tuple[int, int], None] = OrderedDict()
        # descriptor -> length of the streamed files taken and not yet
        # released: still counted in `_bytes`
        self._streamed: dict[int, int] = {}

    def descriptors(self) -> list[int]:
        return [*(fd for fd, _, _ in self._held.values()), *self._streamed]

    def hold(self, key: tuple[int, int], fd: int, length: int) -> None:
        old = self._held.pop(key, None)
        if old is not None:
            self._forget(old, dropped=True)
        self._held[key] = (fd, length, time.monotonic())
        self._bytes += length
        while self._bytes > self.bytes_max and len(self._held) > 1:
            oldest = next(iter(self._held))
            self._forget(self._held.pop(oldest), dropped=True)
            self.shed[oldest] = None
            if len(self.shed) > _SHED_REMEMBERED_MAX:
                self.shed.popitem(last=False)

    def _forget(self, entry: tuple[int, int, float], *, dropped: bool) -> None:
        fd, length, _ = entry
        os.close(fd)
        self._bytes -= length
        if dropped:
            self.dropped += 1
            self.dropped_bytes += length

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._held

    def take_payload(self, key: tuple[int, int]) -> bytes | None:
        """The payload held for this request, whole, no longer held; None if
        none is held (it never came, or was dropped) or it was cut short."""
        entry = self._held.pop(key, None)
        if entry is None:
            return None
        fd, length, _ = entry
        try:
            payload = read_whole(fd, length)
        finally:
            self._forget(entry, dropped=False)
        return payload if len(payload) == length else None

    def take_streamed(self, key: tuple[int, int]) -> StreamedRows | None:
        """The rows streamed into the file held for this request; None if none
        is held, or it was cut short or malformed.

        The file stays open, and counted against the bound of what is held,
        until `release_streamed`.
        """
        entry = self._held.pop(key, None)
        if entry is None:
            return None
        fd, length, _ = entry
        try:
            rows = StreamedRows(fd, length)
        except (OSError, ValueError):
            self._forget(entry, dropped=False)
            return None
        self._streamed[fd] = length
        return rows

    def release_streamed(self, rows: StreamedRows) -> None:
        """Close a file `take_streamed` gave out; its request was answered."""
        length = self._streamed.pop(rows.fd, None)
        if length is not None:
            os.close(rows.fd)
            self._bytes -= length

    def drop_stale(self, stale: float) -> None:
        """Drop the payloads older than ``stale`` (a monotonic time) or whose sender is dead."""
        for key, (_, _, arrived) in list(self._held.items()):
            if arrived < stale or not pid_alive(sender_pid(key[0])):
                self._forget(self._held.pop(key), dropped=True)

    def close(self) -> None:
        for entry in self._held.values():
            self._forget(entry, dropped=False)
        self._held.clear()
        for fd in self._streamed:
            os.close(fd)
        self._streamed.clear()


class Inbox:
    """Reads the request pipe and the side socket; see the module docstring."""

    def __init__(
        self,
        requests: Connection,
        side: socket.socket,
        outbox: Outbox,
        counters: Counters,
        *,
        frame_key: int,
        batch_limit: int,
        handed_over_bytes_max: int = _HANDED_OVER_BYTES_MAX,
    ) -> None:
        # The Connection and the socket are kept, unused, because collecting
        # one closes its descriptor; the inbox works on the raw descriptors.
        self._requests = requests
        self.request_fd = requests.fileno()
        os.set_blocking(self.request_fd, False)
        self._side = side
        side.setblocking(False)
        self._outbox = outbox
        self._counters = counters
        self.frames = FrameReader(frame_key)
        self.assembler = Assembler()
        self.backlog: deque[Request] = deque()
        # (sender, slot) of the requests the loop took from the backlog and
        # has not answered yet: the loop fills it and clears it per batch.
        self.in_hand: set[Key] = set()
        # The slot of the session being served while it holds a request of
        # that slot unanswered (its first, its queued own, its carried
        # COMMIT): set and cleared by the session (`session.py`).
        self.session_slot: Key | None = None
        self._batch_limit = batch_limit
        # How many requests `read_available` takes into the backlog: one
        # batch, or more while a session holds the others (`hold_requests`).
        self._read_limit = batch_limit
        self.consumed = 0  # bytes read from the request pipe so far
        self.eof = False  # no write end of the request pipe is left anywhere
        self.handovers = HandOvers(handed_over_bytes_max)
        # (sender, request id) -> the rows of a streamed request, until served
        self.streams: dict[tuple[int, int], StreamedRows] = {}
        # (sender, slot) -> (request id awaited, stream offset it must appear by).
        # Empty but after a restart; never rebound (`read_available` holds it).
        self.awaited: dict[Key, tuple[int, int]] = {}

    def descriptors(self) -> list[int]:
        """Every descriptor held here: the request pipe, the side socket, payload files."""
        return [self.request_fd, self._side.fileno(), *self.handovers.descriptors()]

    def hold_requests(self, limit: int | None) -> None:
        """Read up to ``limit`` requests into the backlog (a session's next
        statement may be queued behind others), or up to one batch for None."""
        self._read_limit = self._batch_limit if limit is None else limit

    def queued_bytes(self) -> int:
        """Bytes in the request pipe, not read yet."""
        answer = fcntl.ioctl(self.request_fd, termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", answer)[0])

    def holds(self, key: Key) -> bool:
        """Whether a request from this slot is queued here or being served
        (by a batch or by the open session)."""
        return (
            key in self.in_hand
            or key == self.session_slot
            or any(r.sender == key[0] and r.slot == key[1] for r in self.backlog)
        )

    # -- the request pipe ---------------------------------------------------------

    def read_available(self) -> None:
        """Take every request already queued, up to the read limit in the backlog."""
        backlog = self.backlog
        append = backlog.append
        limit = self._read_limit
        awaited = self.awaited  # empty but after a restart
        while len(backlog) < limit:
            try:
                data = os.read(self.request_fd, _READ_SIZE)
            except BlockingIOError:
                break
            if not data:
                # No write end is left anywhere (rare: a fork-started writer
                # inherits one): nobody can send again.
                self.eof = True
                break
            drained = len(data) < _READ_SIZE  # then skip the read that finds nothing
            self.consumed += len(data)
            for frame in self.frames.feed(data):
                flags = frame.flags
                request: Request | None
                if flags == WHOLE:  # the usual request: `Assembler.add`'s first case, inlined
                    kind, _, sender, request_id, slot, payload = frame
                    request = _new_tuple(Request, (kind, sender, request_id, slot, payload))
                elif flags & HANDED_OVER:
                    request = self._take_handed_over(frame)
                else:
                    request = self.assembler.add(frame)
                if request is not None:
                    append(request)
                    if awaited:
                        self._arrived(request)
            if drained:
                break
        if awaited:
            self.report_lost()

    def _take_handed_over(self, frame: Frame) -> Request | None:
        """The request whose payload was handed over as a file; None if lost.

        A streamed executemany's rows stay in their file: the request carries
        its head (deadline, sql), and its `StreamedRows` wait in `streams`
        until the request is served (`attach_streams`).
        """
        key = (frame.sender, frame.request_id)
        handovers = self.handovers
        if key not in handovers:
            self.read_side_socket()  # sent before the frame: queued there
        if frame.flags & STREAMED:
            rows = handovers.take_streamed(key)
            if rows is not None:
                self.streams[key] = rows
                return Request(frame.kind, frame.sender, frame.request_id, frame.slot, rows.head)
        else:
            payload = handovers.take_payload(key)
            if payload is not None:
                return Request(frame.kind, frame.sender, frame.request_id, frame.slot, payload)
        # A writer that died had taken the file (or it was cut short), or the
        # bound on what is held dropped it: the request never ran.
        self.answer_lost(Request(frame.kind, frame.sender, frame.request_id, frame.slot, b""))
        return None

    def attach_streams(
        self, batch: list[Work], extra: list[tuple[Request, bytes]]
    ) -> list[StreamedRows]:
        """Give the streamed requests taken for this batch their rows; return
        the files to release (`release_streamed`) once they are answered.

        Only called while some request is streamed: an ordinary batch pays
        one test per batch, none per request.
        """
        streams = self.streams
        taken: list[StreamedRows] = []
        for index, work in enumerate(batch):
            request = work.request
            rows = streams.pop((request.sender, request.request_id), None)
            if rows is not None:
                batch[index] = work._replace(body=(work.body[0], rows))
                taken.append(rows)
        for request, _ in extra:  # expired, or a head that did not unpickle
            rows = streams.pop((request.sender, request.request_id), None)
            if rows is not None:
                taken.append(rows)
        return taken

    def release_streamed(self, taken: list[StreamedRows]) -> None:
        """Close the files `attach_streams` gave out; their requests were answered."""
        for rows in taken:
            self.handovers.release_streamed(rows)

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
                self.handovers.hold((sender, request_id), fds[0], length)
            else:
                for fd in fds:
                    os.close(fd)

    def _register_pipe(self, key: Key, fd: int, awaiting: int) -> None:
        if self._outbox.register(key, fd, awaiting):
            return  # its reply was kept for it, and is sent
        if not awaiting:
            # A fresh pipe: whatever an older pipe under this number awaited
            # was given up by its caller, and must not be answered on this one.
            self.awaited.pop(key, None)
        elif not self.holds(key):  # if held, its reply will find the new pipe
            # Everything the caller sent before it registered this pipe is in
            # the pipe now, or was taken by the writer that died. Declared
            # lost by the next `report_lost`.
            self.awaited[key] = (awaiting, self.consumed + self.queued_bytes())

    def route_unrouted(self) -> None:
        """Route the replies the outbox found no pipe for, once the side
        socket was read (their registrations are queued there)."""
        self.read_side_socket()
        outbox = self._outbox
        if self.awaited:  # a reply on its way answers what the slot awaits
            for request, _ in outbox.unrouted:
                self._arrived(request)
        outbox.route_unrouted()

    # -- restarts ---------------------------------------------------------------

    def _arrived(self, request: Request) -> None:
        """A request was read (or answered): if its slot awaited it, it is no longer lost."""
        awaited = self.awaited.get((request.sender, request.slot))
        if awaited is not None and awaited[0] == request.request_id:
            del self.awaited[(request.sender, request.slot)]

    def report_lost(self) -> None:
        """Answer each awaited request the stream has been read past: the dead writer took it.

        Only between chunks of frames: every request read so far is queued.
        """
        consumed = self.consumed
        for key, (request_id, offset) in list(self.awaited.items()):
            if consumed >= offset:
                del self.awaited[key]
                self._counters.lost_requests += 1
                lost = WriterCrashed(
                    "the writer process died after taking this request; the outcome is unknown"
                )
                # Without a pipe, its caller is gone too (its pipe failed).
                self._outbox.send_if_registered(key, error_reply(request_id, lost))

    def answer_lost(self, request: Request) -> None:
        """Answer a request whose handed-over payload is gone: it never ran.

        Its payload was dropped by the bound on what is held (`QueueFull`),
        or a writer that died had taken it (`WriterCrashed`). Answered here,
        so nothing else may answer it: it is no longer awaited.
        """
        self.awaited.pop((request.sender, request.slot), None)
        error: BaseException
        shed = (request.sender, request.request_id)
        if shed in self.handovers.shed:
            del self.handovers.shed[shed]
            error = QueueFull(
                "the writer held more bulk payloads waiting to be served than its bound"
                f" ({self.handovers.bytes_max >> 20} MiB) and dropped this one, the"
                " oldest; not applied"
            )
            self._counters.count_error(error)
        else:
            self._counters.lost_requests += 1
            error = WriterCrashed(
                "the writer process died while receiving this request; it was not applied"
            )
        outbox = self._outbox
        outbox.send(request, error_reply(request.request_id, error))
        if outbox.unrouted:
            self.route_unrouted()

    def add_figures(self, figures: dict[str, Any]) -> None:
        """Its figures for `stats()`: what waits to be read, what was dropped."""
        queued = self.queued_bytes()
        # Requests are typically one frame; a rough count is what a dashboard needs.
        figures["queue_depth"] = len(self.backlog) + -(-queued // 256)
        figures["queued_bytes"] = queued
        figures["resync_skipped_bytes"] = self.frames.skipped
        figures["dropped_partial_requests"] = self.assembler.dropped + self.handovers.dropped
        figures["dropped_partial_request_bytes"] = (
            self.assembler.dropped_bytes + self.handovers.dropped_bytes
        )

    # -- housekeeping -----------------------------------------------------------

    def housekeeping(self, stale: float) -> None:
        """Forget the reply pipes whose reader is gone, and payloads and partial
        requests older than ``stale`` (a monotonic time) or whose sender is dead."""
        self.read_side_socket()
        for key in self._outbox.drop_broken():
            self.awaited.pop(key, None)
        self.handovers.drop_stale(stale)
        if self.awaited:
            self.report_lost()
        assembler = self.assembler
        dead = {sender for sender in assembler.senders() if not pid_alive(sender_pid(sender))}
        if dead:
            assembler.drop_senders(dead)
        assembler.drop_stale(stale)

    def close(self) -> None:
        """Close every payload file held."""
        self.handovers.close()
