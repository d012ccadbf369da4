"""State shared by the supervisor, the writer and every caller, in shared memory.

One small ctypes structure (no lock: each field has a single writer, and a
reader only needs a recent value). Callers read it to word their errors
("closed", "died", "backing off") and to fail fast when no writer can serve;
the writer publishes what it is busy with so that the supervisor's watchdog
can tell a hang, and whether it ever served a batch; the supervisor publishes
restarts and what it is doing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
import time
import weakref
from multiprocessing import reduction
from typing import Any

# Values of SharedState.status: what a caller may do.
RUNNING = 0  # send: a writer serves, or a successor is starting and will serve it
CLOSED = 1  # closed on purpose: close(), SIGTERM, or the owner is gone
DEAD = 2  # died with restart=False: no writer will come back
# Writers keep dying before they serve anything: calls fail fast with
# WriterCrashed, while the supervisor keeps retrying; RUNNING again once a
# writer is ready.
BACKING_OFF = 3

# Values of SharedState.phase: what the supervisor is doing (for messages and stats).
STARTING = 0  # a writer process is starting up
SERVING = 1  # the writer is ready and serving
RESTARTING = 2  # a writer died; its successor starts after a short backoff
WAITING = 3  # past the burst limit: the next try is at retry_at
STOPPED = 4  # closed, or dead with restarts off

# SharedState.busy_until of a writer that has not begun a batch yet: the
# supervisor sets it before each writer starts, the writer overwrites it with
# its first batch. A writer that dies with it still set died "young".
NEVER_BUSY = -1.0


class SharedState(ctypes.Structure):
    """Lives in shared memory; create with `new_shared_state`."""

    _fields_ = (
        ("status", ctypes.c_int),
        ("generation", ctypes.c_int),  # +1 for every writer process started
        ("restarts", ctypes.c_int),
        ("writer_pid", ctypes.c_int),
        ("last_exit", ctypes.c_int),  # exit code of the last writer that died
        ("busy_until", ctypes.c_double),  # monotonic; 0.0 while idle; NEVER_BUSY
        ("phase", ctypes.c_int),
        ("young_deaths", ctypes.c_int),  # writers in a row that died before serving
        ("retry_at", ctypes.c_double),  # wall clock (time.time()) of the next try
    )


class MappedState(SharedState):
    """A `SharedState` in a shared mapping of an anonymous file, ``fd``.

    Memory that a descriptor names can be handed to any process: to children
    at start (pickled as a duplicate of ``fd``) and, over a Unix socket, to
    processes that connect (`mpwriter.connect`). The mapping lives as long as
    the structure; ``fd`` is closed when the structure is collected.
    """

    fd: int

    def __reduce__(self) -> tuple[Any, ...]:
        # Only while a child is being started: DupFd has no channel otherwise.
        return (_rebuild_state, (reduction.DupFd(self.fd),))


def new_shared_state(ctx: Any = None) -> Any:
    """A zeroed `SharedState` in shared memory, picklable to children at start.

    ``ctx`` is not used: the memory is a mapped file, whatever the start method.
    """
    del ctx
    create = getattr(os, "memfd_create", None)
    if create is not None:
        fd = create("mpwriter-state", os.MFD_CLOEXEC)
    else:  # no memfd (not Linux): a file nobody can open by name
        fd, name = tempfile.mkstemp(prefix="mpwriter-state-")
        os.unlink(name)
    try:
        os.ftruncate(fd, ctypes.sizeof(SharedState))
        return attach_state(fd)
    except BaseException:
        os.close(fd)
        raise


def attach_state(fd: int) -> Any:
    """The `SharedState` mapped from ``fd`` (which it owns and closes when collected).

    Raises ValueError if ``fd`` is not a file of the state's size.
    """
    size = ctypes.sizeof(SharedState)
    if os.fstat(fd).st_size != size:
        raise ValueError("not a mpwriter shared state")
    mapping = mmap.mmap(fd, size)
    state = MappedState.from_buffer(mapping)  # holds the mapping
    state.fd = fd
    weakref.finalize(state, os.close, fd)
    return state


def _rebuild_state(fd: Any) -> Any:
    return attach_state(fd.detach())


# last_exit when the exit status was taken by someone else.
EXIT_UNKNOWN = -1000


def describe_exit(code: int) -> str:
    if code == EXIT_UNKNOWN:
        return "died (its exit status was reaped elsewhere)"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def describe_state(state: Any) -> str:
    """What the service is doing, in words: "running", "restarting",
    "backing off until 12:00:30 (...)", "closed" or "dead"."""
    status = state.status
    if status == CLOSED:
        return "closed"
    if status == DEAD:
        return "dead"
    phase = state.phase
    if status == BACKING_OFF or phase == WAITING:
        until = time.strftime("%H:%M:%S", time.localtime(state.retry_at))
        return (
            f"backing off until {until} ({state.young_deaths} writers in a row died before serving)"
        )
    if phase in (STARTING, RESTARTING):
        return "restarting"
    return "running"


def describe_outage(state: Any) -> str:
    """Why a caller cannot be served now, for a `WriterCrashed` message."""
    if state.status == DEAD:
        return describe_exit(state.last_exit)
    if state.status == BACKING_OFF:
        return f"{describe_exit(state.last_exit)}; {describe_state(state)}"
    return "died"
