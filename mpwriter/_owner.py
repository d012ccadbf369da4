"""Starting the writer process and stopping it: the owner's side.

The process that calls `start()` owns the writer. Forked children (gunicorn
workers, fork-started pool workers) inherit a handle but never ownership:

- multiprocessing records the writer among the owner's children, and a forked
  child inherits that record. At the child's exit, multiprocessing would
  SIGTERM "its" daemonic children -- the writer -- or fail joining a process
  that is not its own. So the child drops the writer from that record.
- The writer watches a *lifeline* pipe whose write end only the owner keeps
  (children close their inherited copy after fork): when the owner is gone,
  however it died, the writer reads EOF, serves what is queued and exits,
  releasing the lock file instead of lingering as an orphan.
- Liveness is judged from the process sentinel, never `is_alive()`: a parent
  that reaps children itself (gunicorn's master calls ``waitpid(-1)``) steals
  the exit status, and `is_alive()` then stays True forever.
"""

from __future__ import annotations

import atexit
import fcntl
import multiprocessing
import multiprocessing.process
import os
import socket
import sqlite3
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from typing import Any

from ._client import Writer
from ._errors import WriterCrashed
from ._wire import Kind, encode_frames, make_sender_token
from ._writer import CLOSED, NO_REPLY, WriterConfig, serve

_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
_KILL_GRACE = 2.0

# Strong references: a forked child must still find every owner here after its
# handles have dropped theirs (the order of after-fork hooks is not ours).
_owners: set[_Owner] = set()


def start(
    path: str | os.PathLike[str],
    *,
    synchronous: str = "NORMAL",
    init: str | Callable[[sqlite3.Connection], object] | None = None,
    timeout: float = 30.0,
    context: str | BaseContext | None = None,
    max_batch: int = 256,
    queue_bytes: int = 1 << 20,
    start_timeout: float = 30.0,
) -> Writer:
    """Start the writer process for the database at ``path``; return its handle.

    ``synchronous`` is "NORMAL" (committed writes survive a crash of any
    process; the default) or "FULL"/"EXTRA" (also a power loss). ``init`` is
    an SQL script or a function of the connection, run once before serving
    (a function must be importable by the writer under spawn/forkserver).
    ``timeout`` is the default per-call timeout in seconds. ``context`` is a
    multiprocessing context or its name ("fork", "spawn", "forkserver").
    ``max_batch`` caps how many requests one group commit takes;
    ``queue_bytes`` sizes the request pipe (Linux; capped by the system).

    Raises `WriterAlreadyRunning` if another writer serves this file, the
    sqlite3 error if the database cannot be opened or ``init`` fails, and
    `WriterCrashed` if the writer dies before it is ready.
    """
    path = os.fspath(path)
    if path == ":memory:" or path.startswith("file:"):
        raise ValueError("mpwriter needs a database file path (not ':memory:' or a URI)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"the directory of {path!r} does not exist: {directory!r}")
    synchronous = synchronous.upper()
    if synchronous not in _SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {_SYNCHRONOUS}, not {synchronous!r}")
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    # Any: typeshed's BaseContext lacks Process(), which every concrete context has.
    ctx: Any = context if isinstance(context, BaseContext) else multiprocessing.get_context(context)
    config = WriterConfig(os.path.abspath(path), synchronous, init, max_batch)

    request_r, request_w = os.pipe()
    _resize_pipe(request_w, queue_bytes)
    os.set_blocking(request_w, False)
    registration_writer, registration_client = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    registration_client.setblocking(False)
    lifeline_r, lifeline_w = os.pipe()
    ready_r, ready_w = ctx.Pipe(duplex=False)
    state = ctx.RawValue("b", 0)
    writer_ends = (
        Connection(request_r, writable=False),
        registration_writer,
        Connection(lifeline_r, writable=False),
        ready_w,
    )
    process = ctx.Process(
        target=serve,
        name=f"mpwriter {os.path.basename(path)}",
        args=(config, *writer_ends, state),
        daemon=True,
    )
    owner = _Owner(process, lifeline_w, request_w)
    owner.state = state
    owner.sender = make_sender_token(os.getpid())
    # Registered before the fork, so that the writer itself drops the lifeline.
    _owners.add(owner)
    try:
        process.start()
    finally:
        # The writer has its own copies now. Closing ours matters: with no
        # read end left here, callers of a dead writer get EPIPE at once.
        for end in writer_ends:
            end.close()
    try:
        _await_ready(ready_r, process, start_timeout)
    except BaseException:
        owner.kill()
        os.close(request_w)
        registration_client.close()
        raise
    finally:
        ready_r.close()
    writer = Writer(
        config.path, timeout, request_w, registration_client, process.sentinel, state, owner
    )
    atexit.register(_close_at_exit, weakref.ref(writer))
    return writer


def _resize_pipe(fd: int, size: int) -> None:
    setter: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if setter is None:
        return
    try:
        with open("/proc/sys/fs/pipe-max-size") as limit_file:
            size = min(size, int(limit_file.read()))
        fcntl.fcntl(fd, setter, size)
    except OSError:
        pass  # keep the default 64 KiB: a shorter queue, still correct


def _await_ready(ready: Connection, process: Any, start_timeout: float) -> None:
    if not wait([ready, process.sentinel], start_timeout):
        raise WriterCrashed(f"the writer did not become ready within {start_timeout} s")
    if not ready.poll():
        process.join(1.0)
        raise WriterCrashed(
            f"the writer process exited before it was ready (exit code {process.exitcode})"
        )
    try:
        status, value = ready.recv()
    except EOFError:
        process.join(1.0)
        raise WriterCrashed(
            f"the writer process exited before it was ready (exit code {process.exitcode})"
        ) from None
    if status == "error":
        process.join(5.0)
        raise value


class _Owner:
    """The owner's grip on the writer process: close it, kill it, describe its end."""

    def __init__(self, process: Any, lifeline_w: int, request_w: int) -> None:
        self.process = process
        self.lifeline_w: int | None = lifeline_w
        self.request_w = request_w
        self.state: Any = None
        self.sender = 0
        self.pid = os.getpid()

    def describe_exit(self) -> str:
        code = self.process.exitcode if _sentinel_ready(self.process) else None
        if code is None:
            return f"(pid {self.process.pid}) has died"
        if code < 0:
            return f"(pid {self.process.pid}) was killed by signal {-code}"
        return f"(pid {self.process.pid}) exited with status {code}"

    def close(self, timeout: float) -> None:
        """Ask the writer to drain and stop; escalate if it does not in time."""
        asked = False
        if self.state is not None and self.state.value != CLOSED:
            self.state.value = CLOSED
            asked = self._send_close()
        if not asked:
            # The queue is full or the writer is gone: the lifeline still works.
            self._close_lifeline()
        if not wait([self.process.sentinel], timeout):
            self.kill()
        self._close_lifeline()
        self.process.join(0)
        _owners.discard(self)

    def _send_close(self) -> bool:
        (frame,) = encode_frames(Kind.CLOSE, self.sender, 0, NO_REPLY, b"")
        try:
            os.write(self.request_w, frame)
        except OSError:
            return False
        return True

    def kill(self) -> None:
        """Terminate, then kill, reaping with deadlines."""
        self._close_lifeline()
        for stop in (self.process.terminate, self.process.kill):
            if _sentinel_ready(self.process):
                break
            stop()
            wait([self.process.sentinel], _KILL_GRACE)
        self.process.join(0)
        _owners.discard(self)

    def _close_lifeline(self) -> None:
        if self.lifeline_w is not None:
            os.close(self.lifeline_w)
            self.lifeline_w = None

    def forget_in_child(self) -> None:
        """In a forked child: this process owns nothing."""
        if self.lifeline_w is not None:
            os.close(self.lifeline_w)
            self.lifeline_w = None
        multiprocessing.process._children.discard(self.process)  # type: ignore[attr-defined]


def _sentinel_ready(process: Any) -> bool:
    return bool(wait([process.sentinel], 0))


def _close_at_exit(ref: weakref.ref[Writer]) -> None:
    writer = ref()
    if writer is not None and writer._owner is not None:
        writer.close()


def _after_fork_in_child() -> None:
    for owner in list(_owners):
        owner.forget_in_child()
    _owners.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
