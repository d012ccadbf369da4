"""Starting, supervising and stopping the writer process: the owner's side.

The process that calls `start()` owns the writer. It keeps the far ends of
the request pipe and of the registration socket, so that a writer that died
can be replaced without any caller noticing more than a pause; and a
supervisor thread waits on the writer's process sentinel:

- an unexpected death starts a new writer after a backoff, at most
  ``max_restarts`` times in any 60 s; past that the writer is declared dead,
  the far ends are closed, and every caller gets `WriterCrashed` at once;
- a writer busy past a request's stop time plus ``watchdog_grace`` (a C
  extension that ignores signals, a blocked system call) is killed and
  replaced: the requests it held end with "outcome unknown".

Forked children (gunicorn workers, fork-started pool workers) inherit a
handle but never ownership:

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
import logging
import multiprocessing
import multiprocessing.process
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from typing import Any

from .._caller.handle import Writer
from .._errors import WriterCrashed
from .._wire.frames import NO_REPLY, Kind, encode_frames, make_sender_token
from .._wire.state import CLOSED, DEAD, EXIT_UNKNOWN, RUNNING, describe_exit, new_shared_state
from .._writer.engine import WriterConfig
from .._writer.loop import serve

log = logging.getLogger("mpwriter")

_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
_KILL_GRACE = 2.0
_WATCH_INTERVAL = 0.25
_RESTART_WINDOW = 60.0
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0

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
    queue_size: int = 1 << 20,
    restart: bool = True,
    max_restarts: int = 5,
    execution_limit: float | None = None,
    watchdog_grace: float = 5.0,
    slow_request: float | None = 1.0,
    start_timeout: float = 30.0,
    isolation: str = "read committed",
) -> Writer:
    """Start the writer process for the database at ``path``; return its handle.

    ``synchronous`` is "NORMAL" (committed writes survive a crash of any
    process; the default) or "FULL"/"EXTRA" (also a power loss). ``init`` is
    an SQL script or a function of the connection, run by each writer process
    before it serves -- again after a restart, so make it idempotent (a
    function must be importable by the writer under spawn/forkserver).
    ``timeout`` is the default per-call timeout in seconds. ``context`` is a
    multiprocessing context or its name ("fork", "spawn", "forkserver").

    ``max_batch`` caps how many requests one group commit takes;
    ``queue_size`` is the request pipe's capacity in bytes (Linux; capped by
    the system; a typical request takes 100-300 bytes).

    ``restart``: replace a writer that died unexpectedly, at most
    ``max_restarts`` times in any minute. ``execution_limit``: seconds a single
    request may run before it is interrupted (`Interrupted`); by default a
    request may run until its caller's timeout. ``watchdog_grace``: how long
    past that the writer may stay stuck (in C code that ignores interrupts)
    before the owner kills and replaces it. ``slow_request``: log a warning
    (logger "mpwriter") for requests slower than this many seconds, end to
    end; None turns it off.

    ``path`` may also be a PostgreSQL URL (``postgresql://user@host:port/db``
    or ``postgres://``; needs ``mpwriter[postgres]``): the writer then holds
    one connection to that server, and ``isolation`` ("read committed", the
    default, or "serializable", "repeatable read") sets its transactions'
    level; ``synchronous`` applies to SQLite only. See the README's
    PostgreSQL section for the differences.

    Raises `WriterAlreadyRunning` if another writer serves this file, the
    sqlite3 error if the database cannot be opened or ``init`` fails, and
    `WriterCrashed` if the writer dies before it is ready.
    """
    path = os.fspath(path)
    postgres = path.startswith(("postgresql://", "postgres://"))
    if isolation not in ("read committed", "repeatable read", "serializable"):
        raise ValueError(f"unknown isolation level {isolation!r}")
    if postgres:
        pass  # a server URL: no file, no directory to check
    elif path == ":memory:" or path.startswith("file:"):
        raise ValueError("mpwriter needs a database file path (not ':memory:' or a URI)")
    else:
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
    config = WriterConfig(
        path if postgres else os.path.abspath(path),
        synchronous,
        init,
        max_batch,
        execution_limit,
        slow_request,
        isolation=isolation,
    )

    owner = _Owner(ctx, config, queue_size, restart, max_restarts, watchdog_grace)
    _owners.add(owner)  # before the first fork, so that the writer drops the lifeline
    try:
        owner.launch(start_timeout)
    except BaseException:
        owner.abandon()
        raise
    # The handle's path is for display (repr, logs): a URL's password stays out.
    shown = _without_password(config.path) if postgres else config.path
    writer = Writer(shown, timeout, owner.request_w, owner.registration_client, owner.state, owner)
    owner.start_supervising(start_timeout)
    atexit.register(_close_at_exit, weakref.ref(writer))
    return writer


def _without_password(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


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


class _Owner:
    """The owner's grip on the writer: launch, supervise, close, kill."""

    def __init__(
        self,
        ctx: Any,
        config: WriterConfig,
        queue_size: int,
        restart: bool,
        max_restarts: int,
        watchdog_grace: float,
    ) -> None:
        self.ctx = ctx
        self.config = config
        self.restart = restart
        self.max_restarts = max_restarts
        self.watchdog_grace = watchdog_grace
        self.sender = make_sender_token(os.getpid())
        self.state = new_shared_state(ctx)
        self.process: Any = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._restart_times: deque[float] = deque()

        self.request_r: int | None
        self.request_r, self.request_w = os.pipe()
        _resize_pipe(self.request_w, queue_size)
        os.set_blocking(self.request_w, False)
        registration_writer, self.registration_client = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_DGRAM
        )
        self.registration_writer: socket.socket | None = registration_writer
        self.registration_client.setblocking(False)
        self.lifeline_r: int | None
        self.lifeline_r, lifeline_w = os.pipe()
        self.lifeline_w: int | None = lifeline_w

    # -- the writer process -------------------------------------------------------

    def launch(self, start_timeout: float) -> None:
        """Start a writer process and wait until it serves (or fails to)."""
        assert self.request_r is not None, "far ends already released"
        assert self.lifeline_r is not None, "far ends already released"
        assert self.registration_writer is not None, "far ends already released"
        ready_r, ready_w = self.ctx.Pipe(duplex=False)
        # Duplicates: the copies handed over are closed here once the writer
        # has its own, and a forked writer closes the owner's originals.
        writer_ends = (
            Connection(os.dup(self.request_r), writable=False),
            self.registration_writer.dup(),
            Connection(os.dup(self.lifeline_r), writable=False),
            ready_w,
        )
        process = self.ctx.Process(
            target=serve,
            name=f"mpwriter {os.path.basename(self.config.path)}",
            args=(self.config, *writer_ends, self.state),
            daemon=True,
        )
        self.state.generation += 1
        try:
            process.start()
        finally:
            for end in writer_ends:
                end.close()
        self.process = process
        try:
            _await_ready(ready_r, process, start_timeout)
        except BaseException:
            self.kill()
            raise
        finally:
            ready_r.close()
        if not self.restart:
            # Nothing to hand to a successor: let the writer hold the only
            # far ends, so that its death shows at once as EPIPE and EOF.
            self._release_far_ends()

    def start_supervising(self, start_timeout: float) -> None:
        self._supervisor = threading.Thread(
            target=self._supervise,
            args=(start_timeout,),
            name=f"mpwriter-supervisor {os.path.basename(self.config.path)}",
            daemon=True,
        )
        self._supervisor.start()

    def _supervise(self, start_timeout: float) -> None:
        while not self._closing.is_set():
            process = self.process
            if not wait([process.sentinel], _WATCH_INTERVAL):
                self._watchdog(process)
                continue
            # The sentinel can fire a moment before the exit status is ready:
            # join() waits for it, unless someone else reaped the process.
            process.join(_KILL_GRACE)
            code = process.exitcode
            if code is None:
                # Reaped by someone else: multiprocessing never learns it
                # ended, and would SIGTERM its (maybe reused) pid at our exit.
                multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
            self.state.last_exit = code if code is not None else EXIT_UNKNOWN
            if self._closing.is_set() or self.state.status == CLOSED:
                return  # asked to stop (close(), SIGTERM, or the lifeline)
            log.error(
                "mpwriter: the writer process (pid %s) %s",
                process.pid,
                describe_exit(self.state.last_exit),
            )
            if not self._may_restart():
                self._give_up()
                return
            try:
                self._relaunch(start_timeout)
            except Exception:
                # It died (or failed) before it was ready: that counts as a
                # restart, and the next turn of this loop tries again while
                # the cap allows.
                log.exception("mpwriter: could not restart the writer")

    def _watchdog(self, process: Any) -> None:
        busy_until = self.state.busy_until
        if busy_until and time.monotonic() > busy_until + self.watchdog_grace:
            log.error(
                "mpwriter: the writer (pid %s) is stuck %.1f s past a request's limit; killing it",
                process.pid,
                time.monotonic() - busy_until,
            )
            self.state.busy_until = 0.0
            process.kill()

    def _may_restart(self) -> bool:
        if not self.restart:
            return False
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > _RESTART_WINDOW:
            self._restart_times.popleft()
        return len(self._restart_times) < self.max_restarts

    def _relaunch(self, start_timeout: float) -> None:
        delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** len(self._restart_times))
        self._restart_times.append(time.monotonic())
        if self._closing.wait(delay):
            return
        with self._lock:
            if self._closing.is_set():
                return
            # Counted first: the new writer may answer stats() before launch returns.
            self.state.restarts += 1
            self.launch(start_timeout)
        log.warning("mpwriter: writer restarted (pid %s)", self.process.pid)

    def _give_up(self) -> None:
        """No writer will come back: make every caller fail now, not at its timeout."""
        with self._lock:
            if self.state.status == RUNNING:
                self.state.status = DEAD
            self._release_far_ends()

    def _release_far_ends(self) -> None:
        # Callers hold self._lock (or run single-threaded, after a fork): a
        # descriptor closed twice could close an unrelated one reusing its number.
        # Closing the socket also closes the reply pipes queued in it, so that
        # callers awaiting a successor see EOF.
        if self.registration_writer is not None:
            self.registration_writer.close()
            self.registration_writer = None
        for name in ("request_r", "lifeline_r"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    # -- stopping ---------------------------------------------------------------------

    def close(self, timeout: float) -> None:
        """Ask the writer to drain and stop; escalate if it does not in time."""
        with self._lock:
            self._closing.set()
            asked = False
            if self.state.status == RUNNING:
                self.state.status = CLOSED
                asked = self._send_close()
            if not asked:
                # The queue is full or the writer is gone: the lifeline still works.
                self._close_lifeline()
            if not wait([self.process.sentinel], timeout):
                self.kill()
            self._close_lifeline()
            self.process.join(_KILL_GRACE)
            self._release_far_ends()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(_WATCH_INTERVAL * 4)
        _owners.discard(self)

    def _send_close(self) -> bool:
        (frame,) = encode_frames(Kind.CLOSE, self.sender, 0, NO_REPLY, b"")
        try:
            os.write(self.request_w, frame)
        except OSError:
            return False
        return True

    def kill(self) -> None:
        """Terminate, then kill, the current writer process, reaping with deadlines."""
        for stop in (self.process.terminate, self.process.kill):
            if _sentinel_ready(self.process):
                break
            stop()
            wait([self.process.sentinel], _KILL_GRACE)
        self.process.join(_KILL_GRACE)

    def abandon(self) -> None:
        """Clean up after a failed first launch."""
        if self.process is not None:
            self.kill()
        self._close_lifeline()
        self._release_far_ends()
        os.close(self.request_w)
        self.registration_client.close()
        _owners.discard(self)

    def _close_lifeline(self) -> None:
        if self.lifeline_w is not None:
            os.close(self.lifeline_w)
            self.lifeline_w = None

    def forget_in_child(self) -> None:
        """In a forked child: this process owns nothing, and keeps no far end.

        Only the owner may hold the far ends: a child holding the request
        pipe's read end would keep a dead writer's callers from seeing EPIPE.
        (A forked writer uses its own duplicates, passed as its arguments.)
        """
        self._close_lifeline()
        self._release_far_ends()
        if self.process is not None:
            multiprocessing.process._children.discard(self.process)  # type: ignore[attr-defined]


def _await_ready(ready: Connection, process: Any, start_timeout: float) -> None:
    if not wait([ready, process.sentinel], start_timeout):
        raise WriterCrashed(f"the writer did not become ready within {start_timeout} s")
    try:
        status, value = ready.recv() if ready.poll() else ("exit", None)
    except EOFError:
        status, value = "exit", None
    if status == "exit":
        process.join(1.0)
        raise WriterCrashed(
            f"the writer process exited before it was ready (exit code {process.exitcode})"
        )
    if status == "error":
        process.join(5.0)
        assert isinstance(value, BaseException)
        raise value


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
