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
  slot, naming the request it awaits (`calls.reregister`).
- A forked child never touches its parent's pipes. `os.register_at_fork`
  (which covers raw ``os.fork()`` as gunicorn uses it, not only
  multiprocessing) gives each pool fresh per-process state in the child --
  new sender token, no pipes, no collector thread, new locks -- and closes
  every descriptor the parent's state had open, including those of requests
  in flight in another thread at the fork.

This module does no waiting: sending on the side socket and waiting for it
are steps of the protocol in `calls.py`.
"""

from __future__ import annotations

import atexit
import itertools
import os
import socket
import threading
import weakref
from typing import Any, Protocol

from .._errors import WriterClosed, WriterCrashed, WriterUnavailable
from .._wire.frames import NO_REPLY, make_sender_token
from .._wire.state import CLOSED, RUNNING, describe_outage


class CollectorHandle(Protocol):
    """What the pool needs of a handle's futures collector (`futures.Collector`).

    A protocol rather than an import: the collector runs the call protocol,
    which borrows slots from this pool, so importing it here would be a circle.
    """

    broken: bool

    def stop(self) -> None: ...


class Slot:
    """A reply pipe: this process reads ``fd``; the writer holds the write end."""

    __slots__ = ("fd", "number")

    def __init__(self, number: int, fd: int) -> None:
        self.number = number
        self.fd = fd


class ProcessState:
    """A pool's per-process state; replaced wholesale in a forked child."""

    def __init__(self) -> None:
        self.sender = make_sender_token(os.getpid())
        self.lock = threading.Lock()
        # Held by the one thread that dials a connected handle's endpoint
        # again (`Lifetime.revive`), not `lock`: a dial may take a call's
        # whole timeout, and `lock` is taken on the request path.
        self.redial = threading.Lock()
        self.free: list[Slot] = []
        self.slot_numbers = itertools.count()
        self.open_slots: set[int] = set()  # numbers of the pipes not retired yet
        self.request_ids = itertools.count()
        self.collector: CollectorHandle | None = None
        self.posts_dropped = 0  # not yet reported to the writer
        # Every descriptor this state opened: a forked child closes them all,
        # including those of requests in flight in another thread at the fork.
        self.fds: set[int] = set()


class PipePool:
    """A handle's reply pipes, its side socket, and what the protocol needs to
    know about the writer: whether it runs, and which error says it does not.

    ``local`` is the per-process state; the request path reads ``local.free``
    directly (one attribute lookup on the hot path).
    """

    def __init__(self, registration: socket.socket, state: Any, frame_key: int = 0) -> None:
        self.registration = registration
        self.state = state  # the shared state word (`_wire.state`)
        # The request stream's key (`_wire.frames.new_frame_key`): every frame
        # this pool's requests send is keyed with it.
        self.frame_key = frame_key
        self.closed = False  # closed through this handle, in this process
        self.creator_pid = os.getpid()
        self.local = ProcessState()
        _pools.add(self)

    # -- what the protocol asks ------------------------------------------------------

    def writer_running(self) -> bool:
        """Whether a writer serves, or will again after a restart."""
        return not self.closed and self.state.status == RUNNING

    def unavailable(self, *, sent: bool) -> WriterUnavailable:
        """The error that says why the writer cannot be reached right now."""
        outcome = "the outcome is unknown" if sent else "the request was not sent"
        state = self.state
        if self.closed:
            return WriterClosed(f"this Writer handle was closed; {outcome}")
        if state.status == CLOSED:
            return WriterClosed(f"the writer was closed; {outcome}")
        how = describe_outage(state)
        return WriterCrashed(f"the writer process (pid {state.writer_pid}) {how}; {outcome}")

    def next_request_id(self) -> int:
        # Never 0: a registration awaiting request 0 is a fresh one.
        return next(self.local.request_ids) % 0xFFFFFFFF + 1

    def next_slot_number(self) -> int:
        local = self.local
        # Numbers wrap below NO_REPLY (which marks a request without reply).
        # After a wrap, skip the numbers of pipes still open: the writer would
        # take a second pipe under the same number for a replacement of the first.
        number = next(local.slot_numbers) % NO_REPLY
        while number in local.open_slots:
            number = next(local.slot_numbers) % NO_REPLY
        return number

    # -- descriptors ------------------------------------------------------------------

    def new_pipe(self) -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        self.local.fds.update((read_fd, write_fd))
        os.set_blocking(read_fd, False)
        return read_fd, write_fd

    def open_slot(self, number: int, read_fd: int) -> Slot:
        """A slot for a pipe whose write end the writer now holds."""
        self.local.open_slots.add(number)
        return Slot(number, read_fd)

    def replace_fd(self, slot: Slot, read_fd: int) -> None:
        """After a re-registration: ``slot`` reads from a new pipe."""
        self.close_fd(slot.fd)
        slot.fd = read_fd

    def retire(self, slot: Slot) -> None:
        """Close ``slot`` for good: it may still receive a reply, which no one must read."""
        self.local.open_slots.discard(slot.number)
        self.close_fd(slot.fd)

    def close_fd(self, fd: int) -> None:
        self.local.fds.discard(fd)
        os.close(fd)

    def release_pipes(self) -> None:
        """Stop the collector thread (failing its futures) and retire the pooled pipes."""
        local = self.local
        with local.lock:
            free, local.free = local.free, []
            collector, local.collector = local.collector, None
        if collector is not None:
            collector.stop()
        for slot in free:
            self.retire(slot)

    def close(self) -> None:
        """`release_pipes`, and close the side socket: for good.

        Requests in flight in other threads fail with `WriterClosed`.
        """
        self.closed = True
        self.release_pipes()
        self.registration.close()

    # -- fork ----------------------------------------------------------------------

    def forget_parent_state(self) -> None:
        """In a forked child: drop the parent's pipes; never read from them."""
        parent = self.local
        self.local = ProcessState()
        for fd in parent.fds:
            os.close(fd)


_pools: weakref.WeakSet[PipePool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool.forget_parent_state()


def _close_at_exit() -> None:
    """At interpreter exit: close every pool this process still holds open.

    A handle alive at exit (a module global, a cache of handles per file, a
    forked child's inherited copy) is never collected before the interpreter
    tears down, and its side socket would then be destroyed open
    (``ResourceWarning: unclosed socket``). Closing here releases only this
    process's descriptors: a forked child closes its copies, never its
    parent's. Registered at import, so it runs after the owner's own exit
    hook (`atexit` runs hooks last-registered first), which stops the
    writer through its handle first.
    """
    for pool in list(_pools):
        if not pool.closed:
            pool.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)
