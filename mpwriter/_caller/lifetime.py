"""A handle's hold on its writer, from creation to release.

`Writer` sends every request on one `Link` (a writer's pool and request
pipe), read from the handle once per request. Everything else about that
hold lives here, in `Lifetime`: whether this process owns the writer (and
stops it on close), how the handle lets its descriptors go (on `close`, and
when it is collected), how a connected handle whose writer is gone dials its
endpoint and swaps in a new link, and how a handle travels to a child.

The link stays an attribute of the handle, not of this object: a request
reads it with one attribute lookup, and `revive` replaces it whole, in one
assignment, under the pool's ``redial`` lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import weakref
from collections.abc import Iterator
from multiprocessing import context as mp_context
from multiprocessing import reduction
from typing import Any, Protocol

from .._errors import NotPicklable, Timeout, WriterUnavailable
from .._wire.state import BACKING_OFF, CLOSED, RUNNING
from .pipe_pool import PipePool


class Owner(Protocol):
    """What the owning process adds to its handle (see `_owner.py`)."""

    def close(self, timeout: float) -> None: ...


class Dialer(Protocol):
    """How a connected handle reaches its writer's endpoint again (`connect.Dialer`)."""

    def dial(self, deadline: float) -> Any: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Link:
    """What a request is sent on: one writer's pool (its reply pipes, side
    socket, state and frame key) and its request pipe. A connected handle
    that dials a new writer replaces its link whole, in one assignment: a
    request reads the link once and so never pairs one writer's pool with
    another's pipe (whose writer would drop the frame as foreign)."""

    pool: PipePool
    request_fd: int


class Handle(Protocol):
    """What `Lifetime` reads and replaces of its handle (`Writer`)."""

    timeout: float
    _link: Link


class Lifetime:
    """The owner, the dialer and the release of one handle (see the module)."""

    def __init__(self, handle: Handle, owner: Owner | None, dialer: Dialer | None) -> None:
        self._owner = owner
        self._owner_pid = os.getpid()
        self.dialer = dialer  # a connected handle's way back to its endpoint
        # A collected handle stops its collector thread (which never refers
        # to the handle) and releases its descriptors. Not at interpreter
        # exit: the owner's own exit hook closes the writer through the handle.
        self._release = _release_when_collected(handle, handle._link, owner is not None)

    @property
    def owner(self) -> Owner | None:
        """The owner, in the process that started the writer only (not a forked child)."""
        return self._owner if os.getpid() == self._owner_pid else None

    def close(self, handle: Handle, timeout: float | None) -> None:
        """`Writer.close`: in the owner, stop the writer first; then let the link go."""
        link = handle._link
        pool = link.pool
        if pool.closed:
            return
        owner = self.owner
        if owner is not None:
            pool.closed = True  # refuse new calls while the writer drains
            owner.close(handle.timeout if timeout is None else timeout)
        pool.close()
        _disarm(link.request_fd)

    def revive(self, handle: Handle, link: Link, deadline: float) -> Link:
        """The link to send on, when ``link``'s writer is not running; or raise why not.

        A connected handle whose writer was closed, or died for good, dials
        its endpoint again, by ``deadline`` (the call's): if another writer
        serves the file now, the handle takes its descriptors and goes on
        with it. Anything else raises the `WriterUnavailable` that says why
        no writer can serve (the request was not sent): at once when nothing
        listens on the endpoint, at ``deadline`` when it does not answer.
        """
        while True:
            pool = link.pool
            if not pool.closed and pool.state.status == RUNNING:
                return link  # another thread's dial found a writer
            if pool.closed or self.dialer is None or pool.state.status == BACKING_OFF:
                raise pool.unavailable(sent=False)  # says which: the handle or the writer
            fresh = self._redial(handle, link, deadline)
            if fresh is not None:
                return fresh
            link = handle._link  # another thread dialed: see what it found

    def _redial(self, handle: Handle, link: Link, deadline: float) -> Link | None:
        """Dial the endpoint and swap in the new writer's link; None if
        another thread replaced ``link`` first.

        One thread of the process dials at a time, under the pool's own
        ``redial`` lock (not the lock its calls take, which would stall every
        thread for the dial); the others wait for it no longer than their own
        deadline.
        """
        pool = link.pool
        with _dialing_alone(pool, deadline):
            if handle._link is not link:
                return None
            assert self.dialer is not None  # `revive` checked
            try:
                grant = self.dialer.dial(deadline)
            except (WriterUnavailable, Timeout) as exc:
                raise _not_redialed(pool, str(exc)) from None
            fresh = Link(
                PipePool(grant.registration, grant.state, grant.offer.frame_key), grant.request_fd
            )
            handle._link = fresh  # one assignment: a request reads the old link or this one
            self._release.detach()
            self._release = _release_when_collected(handle, fresh, False)
        # Calls of other threads may still hold the old link: they fail
        # (WriterClosed, not sent) rather than write into a reused number.
        pool.close()
        _disarm(link.request_fd)
        weakref.finalize(handle, os.close, link.request_fd).atexit = False
        return fresh

    def for_child(self, link: Link) -> tuple[Any, ...]:
        """What rebuilds ``link`` in the child being started (`handle._rebuild`'s
        arguments after the path and timeout): its descriptors duplicated
        into the child, its state, frame key and dialer. Raises `NotPicklable`
        when no child is being started (see `Writer.__reduce__`)."""
        # Descriptors can travel only while a child is being started (they are
        # then passed down with the new process); anywhere else -- a pool task
        # argument, a queue -- there is no channel for them.
        if mp_context.get_spawning_popen() is None:
            raise NotPicklable(
                "a mpwriter.Writer can only be passed to a child process when it is"
                " created (Process args, Pool/ProcessPoolExecutor initializer"
                " arguments: see mpwriter.attach) or inherited through fork; it"
                " cannot be sent as a task argument or through a queue"
            )
        pool = link.pool
        return (
            reduction.DupFd(link.request_fd),
            reduction.DupFd(pool.registration.fileno()),
            pool.state,
            pool.frame_key,
            self.dialer,
        )


@contextlib.contextmanager
def _dialing_alone(pool: PipePool, deadline: float) -> Iterator[None]:
    """Hold ``pool``'s ``redial`` lock, taken by ``deadline`` or never (`WriterUnavailable`)."""
    redial = pool.local.redial
    left = deadline - time.monotonic()
    if left <= 0 or not redial.acquire(timeout=left):
        raise _not_redialed(pool, "its timeout passed while another thread dialed")
    try:
        yield
    finally:
        redial.release()


def _not_redialed(pool: PipePool, why: str) -> WriterUnavailable:
    """``pool``'s error (not sent), with why dialing again found no writer."""
    error = pool.unavailable(sent=False)
    return type(error)(f"{error}; {why}")


def _release_when_collected(handle: Handle, link: Link, owned: bool) -> weakref.finalize[Any, Any]:
    release = weakref.finalize(handle, _release, link.pool, link.request_fd, owned)
    release.atexit = False
    return release


def _release(pool: PipePool, request_fd: int, owned: bool) -> None:
    """When a handle is collected: what `close` releases, and the request pipe.

    The owner's handle keeps the side socket and the request pipe, as it
    always did: they outlive it with the writer, which the owner stops at exit.
    """
    if owned and pool.state.status != CLOSED and os.getpid() == pool.creator_pid:
        pool.release_pipes()
        return
    if not pool.closed:
        pool.close()
    os.close(request_fd)


def _disarm(fd: int) -> None:
    """Point ``fd`` at a pipe nobody reads, keeping its number.

    Other threads may be sending on it while the handle closes. A closed
    number is taken by the next open() anywhere in the process, and their
    frames would land in that file; on a pipe without a reader they fail
    with EPIPE instead, which they report as `WriterClosed`. The number is
    released when the handle is collected.
    """
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.dup2(write_fd, fd, inheritable=False)
    os.close(write_fd)
