"""The caller's end of the reply pipes: a pool per process, and the side socket.

A request is answered on a pipe of its caller's process. The caller makes the
pipe, keeps the read end and sends the write end to the writer over a Unix
datagram socket (the *side socket*, SCM_RIGHTS), naming it by (sender token,
slot number); a request then names its slot, and the writer replies there.
The same socket carries large payloads as a memfd (see `_wire`).

Registering a pipe costs a message and a descriptor, so a process keeps the
pipes it made, pooled per handle, and these invariants hold:

- A pipe is lent to one request at a time. It is taken from ``free`` for the
  request and given back only once a whole reply was read off it, so it never
  holds a byte that belongs to someone else.
- A retired pipe is never reused. A request that ends with its reply unread
  (a timeout, a cancellation, an error whose effect on the pipe is unknown)
  closes the read end instead of giving it back, so a late reply can never
  reach the next request; the writer notices the closed read end (EPIPE on
  a reply, or at its housekeeping) and forgets the slot.
- The writer holds the only write end: this side closes its copy once it is
  sent, so EOF on a read end means the writer that held it is gone. If the
  owner restarts the writer, the caller registers a new pipe for the same
  slot, naming the request it awaits (`PipePool._reregister`).
- A forked child never touches its parent's pipes. `os.register_at_fork`
  (which covers raw ``os.fork()`` as gunicorn uses it, not only
  multiprocessing) gives each handle fresh per-process state in the child --
  new sender token, no pipes, new locks -- and closes every descriptor the
  parent's state had open, including those of requests in flight in another
  thread at the fork.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING

from .._errors import QueueFull, Timeout, WriterUnavailable
from .._wire.frames import (
    NO_REPLY,
    PAYLOAD_HANDOVER,
    PAYLOAD_TAG,
    PIPE_REGISTRATION,
    PIPE_TAG,
    make_sender_token,
)
from .._wire.replies import millis

if TYPE_CHECKING:
    from .futures import Collector


class Slot:
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


class ProcessState:
    """A handle's per-process state; replaced wholesale in a forked child."""

    def __init__(self) -> None:
        self.sender = make_sender_token(os.getpid())
        self.lock = threading.Lock()
        self.free: list[Slot] = []
        self.slot_numbers = itertools.count()
        self.open_slots: set[int] = set()  # numbers of the pipes not retired yet
        self.request_ids = itertools.count()
        self.collector: Collector | None = None
        self.posts_dropped = 0  # not yet reported to the writer
        # Every descriptor this state opened: a forked child closes them all,
        # including those of requests in flight in another thread at the fork.
        self.fds: set[int] = set()


class PipePool:
    """The reply-pipe half of a `Writer` handle: its pool and its side socket.

    A base class rather than a member, so that the request path reaches the
    pool (``self._local.free``) with no call or lookup in between. The
    handle supplies `_unavailable`: only it knows whether it was closed or
    its writer died, which decides the error a failed send raises.
    """

    def __init__(self, registration: socket.socket) -> None:
        self._registration = registration
        self._local = ProcessState()
        _handles.add(self)

    def _unavailable(self, *, sent: bool) -> WriterUnavailable:
        """The error to raise when the writer cannot be reached."""
        raise NotImplementedError

    def _borrow_slot(self, deadline: float) -> Slot:
        """A pipe for one request: a pooled one, or a new one registered by ``deadline``."""
        free = self._local.free
        return free.pop() if free else self._new_slot(deadline)

    def _retire(self, slot: Slot) -> None:
        """Close ``slot`` for good: it may still receive a reply, which no one must read."""
        self._local.open_slots.discard(slot.number)
        self._close_fd(slot.fd)

    def _new_slot(self, deadline: float) -> Slot:
        local = self._local
        # Numbers wrap below NO_REPLY (which marks a request without reply).
        # After a wrap, skip the numbers of pipes still open: the writer would
        # take a second pipe under the same number for a replacement of the first.
        number = next(local.slot_numbers) % NO_REPLY
        while number in local.open_slots:
            number = next(local.slot_numbers) % NO_REPLY
        read_fd, write_fd = self._new_pipe()
        try:
            self._register(number, write_fd, 0, deadline, sent=False)
        except BaseException:
            self._close_fd(read_fd)
            raise
        finally:
            # The writer now holds the only write end: EOF here means it died.
            self._close_fd(write_fd)
        local.open_slots.add(number)
        return Slot(number, read_fd)

    def _reregister(self, slot: Slot, request_id: int, deadline: float) -> None:
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

    def _new_pipe(self) -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        self._local.fds.update((read_fd, write_fd))
        os.set_blocking(read_fd, False)
        return read_fd, write_fd

    def _close_fd(self, fd: int) -> None:
        self._local.fds.discard(fd)
        os.close(fd)

    # -- side socket ---------------------------------------------------------------

    def _register(
        self, number: int, write_fd: int, awaiting: int, deadline: float, *, sent: bool
    ) -> None:
        message = PIPE_REGISTRATION.pack(PIPE_TAG, self._local.sender, number, awaiting)
        self._send_side_message(message, write_fd, deadline, sent=sent)

    def _hand_over(self, payload: bytes, request_id: int, deadline: float) -> None:
        """Send ``payload`` as a memfd, for the frame of ``request_id`` that follows."""
        fd = os.memfd_create("mpwriter-request", os.MFD_CLOEXEC)
        self._local.fds.add(fd)  # a child forked meanwhile closes its copy
        try:
            with open(fd, "wb", closefd=False) as file:
                file.write(payload)
            sender = self._local.sender
            message = PAYLOAD_HANDOVER.pack(PAYLOAD_TAG, sender, request_id, len(payload))
            self._send_side_message(message, fd, deadline, sent=False)
        finally:
            self._close_fd(fd)

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
            # poll, not select: a spawned child's copy of the socket may be
            # numbered past select's limit of 1024.
            poller = select.poll()
            poller.register(self._registration, select.POLLOUT)
            poller.poll(millis(remaining))

    # -- fork ----------------------------------------------------------------------

    def _forget_parent_state(self) -> None:
        """In a forked child: drop the parent's pipes; never read from them."""
        parent = self._local
        self._local = ProcessState()
        for fd in parent.fds:
            os.close(fd)


_handles: weakref.WeakSet[PipePool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handle in list(_handles):
        handle._forget_parent_state()


os.register_at_fork(after_in_child=_after_fork_in_child)
