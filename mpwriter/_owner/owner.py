"""Starting and stopping the writer: the owner's side.

The process that calls `start()` owns the writer, through a supervisor
process that `start()` starts with the chosen multiprocessing context (see
`supervisor.py`): the supervisor forks the writers, waits on them, restarts
them and runs the watchdog. The owner keeps no thread -- so that its later
forks (gunicorn workers, ``fork`` pools) are forks of a single-threaded
process -- and learns what happens from the shared state the supervisor and
the writer publish: whether a writer serves, restarts, calls failing fast
while writers keep dying young, a writer that was closed.

The owner keeps the write end of the supervisor's *control* pipe: its bytes
are commands (close, kill), and its EOF -- however the owner died -- makes the
supervisor stop the writer, which serves what is queued and exits, releasing
the lock file, before the supervisor exits too. The supervisor holds the only
write end of the *report* pipe: EOF there tells the owner it is gone, whoever
reaped it (gunicorn's master calls ``waitpid(-1)``, so the exit status cannot
be relied on).

Forked children (gunicorn workers, fork-started pool workers) inherit a
handle but never ownership:

- multiprocessing records the supervisor among the owner's children, and a
  forked child inherits that record. At the child's exit, multiprocessing
  would join "its" child -- the supervisor -- or fail joining a process that
  is not its own. So the child drops it from that record.
- The child closes its copy of the control pipe's write end (or the
  supervisor would outlive the owner) and of every far end.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import math
import multiprocessing
import multiprocessing.process
import os
import pickle
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from typing import Any

from .._caller.handle import Writer
from .._errors import MissingMainGuard, WriterCrashed, start_failure
from .._wire.address import is_server_url
from .._wire.endpoint import Offer, endpoint_path
from .._wire.frames import NO_REPLY, Kind, encode_frames, make_sender_token, new_frame_key
from .._wire.state import BACKING_OFF, CLOSED, RUNNING, new_shared_state
from .._writer.engine import WriterConfig
from .endpoint import EndpointConfig, group_id
from .handover import FarEnds, start_child
from .supervisor import (
    CLOSE,
    KILL,
    KILL_GRACE,
    STOP,
    EndpointOffer,
    RestartPolicy,
    SupervisorArgs,
    supervise,
)

log = logging.getLogger("mpwriter")

_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
# Of close()'s timeout, what is kept (a tenth at most) for the supervisor to
# kill a writer that did not drain in time, reap it and exit, which takes a
# few milliseconds on an idle machine.
_KILL_RESERVE = 0.25
# How long close() waits for an exiting supervisor to be reapable, even at its deadline.
_JOIN_AT_LEAST = 0.05

# Strong references: a forked child must still find every owner here after its
# handles have dropped theirs (the order of after-fork hooks is not ours).
_owners: set[_Owner] = set()


def _refuse_start_while_main_reimported() -> None:
    """Raise `MissingMainGuard` if this process is re-running the main module's top level.

    multiprocessing sets ``_inheriting`` on the current process while a
    spawn child (or the fork server, preloading ``__main__``) imports the
    parent's main module as ``__mp_main__``; CPython's own
    ``spawn._check_not_importing_main`` reads the same flag. Without this
    check the second writer fails later and far from the cause, as
    `WriterAlreadyRunning` in the child and ``BrokenProcessPool`` in the parent.
    """
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return
    main = sys.modules.get("__mp_main__")
    if main is None:
        return
    where = getattr(main, "__file__", None) or "the main module"
    raise MissingMainGuard(
        f"mpwriter.start() was called while a child process ran the top level of {where} "
        "again: the 'spawn' and 'forkserver' start methods re-import the main module in "
        "every child. Put the code that starts the writer (and the pools) under "
        '`if __name__ == "__main__":`, so that only the main process runs it.'
    )


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
    restart_backoff_max: float = 30.0,
    execution_limit: float | None = None,
    watchdog_grace: float = 5.0,
    slow_request: float | None = 1.0,
    start_timeout: float = 30.0,
    isolation: str = "read committed",
    migrations: Sequence[str | Callable[[Any], object]] = (),
    endpoint: str | os.PathLike[str] | None = None,
    allow_group: int | str | None = None,
    max_session_seconds: float = 60.0,
) -> Writer:
    """Start the writer process for the database at ``path``; return its handle.

    ``synchronous`` is "NORMAL" (committed writes survive a crash of any
    process; the default) or "FULL"/"EXTRA" (also a power loss). ``init`` is
    an SQL script or a function of the connection, run by each writer process
    before it serves -- again after a restart, so make it idempotent (a
    function must be importable by the writer under spawn/forkserver).
    ``timeout`` is the default per-call timeout in seconds. ``context`` is a
    multiprocessing context or its name ("fork", "spawn", "forkserver"): it
    starts the writer's supervisor process, which has no thread and forks
    the writers itself, so that no mpwriter thread ever runs in this process.

    ``max_batch`` caps how many requests one group commit takes;
    ``queue_size`` is the request pipe's capacity in bytes (Linux; capped by
    the system; a typical request takes 100-300 bytes).

    ``restart``: replace a writer that died unexpectedly. A writer that had
    served is replaced at once. One that died young (in start-up, or before
    serving a batch) is replaced after a backoff that doubles from 0.05 s up
    to ``restart_backoff_max`` seconds (30) and resets once a writer serves.
    Past ``max_restarts`` young deaths in a row, calls fail at once with
    `WriterCrashed` ("backing off until ...") while the supervisor keeps
    trying every ``restart_backoff_max`` seconds at most; the service comes
    back by itself when a writer starts and serves.

    ``execution_limit``: seconds a single request may run before it is
    interrupted (`Interrupted`); by default a request may run until its
    caller's timeout. ``watchdog_grace``: how long past that the writer may
    stay stuck (in C code that ignores interrupts) before its supervisor
    kills and replaces it. ``slow_request``: log a warning (logger
    "mpwriter") for requests slower than this many seconds, end to end;
    None turns it off.

    ``migrations``: an ordered list of SQL scripts or functions of the
    connection, applied by the writer after ``init``, once each: each in its
    own transaction with the row that records it in the table
    ``mpwriter_migrations``, so never again at a restart or a later start.
    Only ever append to the list. A failing migration is rolled back whole
    and stops the start with `MigrationFailed` (those before it stay
    applied); so does a database that recorded more migrations than listed.

    ``path`` may also be a PostgreSQL URL (``postgresql://user@host:port/db``
    or ``postgres://``; needs ``mpwriter[postgres]``): the writer then holds
    one connection to that server, and ``isolation`` ("read committed", the
    default, or "serializable", "repeatable read") sets its transactions'
    level; ``synchronous`` applies to SQLite only. See the PostgreSQL
    page of the documentation for the differences.

    ``endpoint``: the Unix socket through which other processes of the
    machine get a handle with `mpwriter.connect` (see docs/deployment.md).
    By default a SQLite writer listens beside the database, at
    ``PATH.mpwriter.sock``; a PostgreSQL writer listens only where
    ``endpoint`` says. Only this process's user may connect, and the
    group ``allow_group`` (a name or id) if given.

    ``max_session_seconds``: the longest a `Writer.session()` transaction may
    last, idle or in all, whatever its caller asks for (60 by default): the
    writer holds every other request while one is open, so a caller cannot
    hold it longer.

    Raises `WriterAlreadyRunning` if another writer serves this file (under
    any name: symlinks and hard links reach the same writer), `UntrustedFile`
    if its lock file is a symlink or another user's, the sqlite3 error if the
    database cannot be opened or ``init`` fails, `MigrationFailed` if a
    migration does, `MissingMainGuard` if called while a spawn/forkserver
    child re-runs the main module's top level, and `WriterCrashed` if the
    writer dies before it is ready.
    """
    _refuse_start_while_main_reimported()
    path, postgres = _database(path)
    synchronous = _check_options(
        synchronous, isolation, max_batch, max_restarts, restart_backoff_max, migrations
    )
    if not 0 < max_session_seconds < math.inf:
        raise ValueError(
            f"max_session_seconds must be a finite positive number, not {max_session_seconds!r}"
        )
    # Any: typeshed's BaseContext lacks Process(), which every concrete context has.
    ctx: Any = context if isinstance(context, BaseContext) else multiprocessing.get_context(context)
    config = WriterConfig(
        path,
        synchronous,
        init,
        max_batch,
        execution_limit,
        slow_request,
        frame_key=new_frame_key(),
        isolation=isolation,
        migrations=tuple(migrations),
        max_session_seconds=float(max_session_seconds),
    )
    policy = RestartPolicy(
        restart, max_restarts, restart_backoff_max, watchdog_grace, start_timeout
    )
    owner = _Owner(ctx, config, queue_size, policy)
    owner.endpoint = _endpoint_config(path, postgres, endpoint, allow_group, timeout, config)
    _owners.add(owner)  # before the first fork, so that the supervisor drops the lifeline
    try:
        owner.launch(start_timeout)
    except BaseException:
        owner.abandon()
        raise
    # The handle's path is for display (repr, logs): a URL's password stays out.
    shown = _without_password(config.path) if postgres else config.path
    writer = Writer(
        shown,
        timeout,
        owner.request_w,
        owner.registration_client,
        owner.state,
        owner,
        frame_key=config.frame_key,
    )
    atexit.register(_close_at_exit, weakref.ref(writer), weakref.ref(owner), timeout)
    return writer


def _database(path: str | os.PathLike[str]) -> tuple[str, bool]:
    """The database ``start`` serves: its real file name, or a server URL; and
    whether it is a PostgreSQL server. Raises ValueError, FileNotFoundError."""
    path = os.fspath(path)
    if is_server_url(path):
        return path, True  # a server URL: no file, no directory to check
    if path == ":memory:" or path.startswith("file:"):
        raise ValueError("mpwriter needs a database file path (not ':memory:' or a URI)")
    # The real name, symlinks and ".." resolved as the kernel does: the
    # writer serves the file itself, and its lock goes beside that name.
    real = os.path.realpath(path)
    directory = os.path.dirname(real)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"the directory of {path!r} does not exist: {directory!r}")
    return real, False


def _check_options(
    synchronous: str,
    isolation: str,
    max_batch: int,
    max_restarts: int,
    restart_backoff_max: float,
    migrations: Sequence[str | Callable[[Any], object]],
) -> str:
    """Refuse `start`'s options that cannot work (ValueError, TypeError);
    return ``synchronous`` as the writer names it."""
    if isolation not in ("read committed", "repeatable read", "serializable"):
        raise ValueError(f"unknown isolation level {isolation!r}")
    synchronous = synchronous.upper()
    if synchronous not in _SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {_SYNCHRONOUS}, not {synchronous!r}")
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    if max_restarts < 0:
        raise ValueError("max_restarts must not be negative")
    if restart_backoff_max <= 0:
        raise ValueError("restart_backoff_max must be positive")
    if isinstance(migrations, str) or not all(
        isinstance(m, str) or callable(m) for m in migrations
    ):
        raise TypeError("migrations must be a list of SQL scripts (str) or functions")
    return synchronous


def _endpoint_config(
    path: str,
    postgres: bool,
    endpoint: str | os.PathLike[str] | None,
    allow_group: int | str | None,
    timeout: float,
    config: WriterConfig,
) -> EndpointConfig | None:
    """Where the writer listens for `connect`, if anywhere (see `start`)."""
    if postgres and endpoint is None:
        if allow_group is not None:
            raise ValueError("allow_group needs an endpoint")
        return None
    where = endpoint_path(config.path, endpoint)
    shown = _without_password(config.path) if postgres else config.path
    gid = None if allow_group is None else group_id(allow_group)
    return EndpointConfig(where, Offer(shown, timeout, config.frame_key), gid)


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
    """The owner's grip on the writer, through its supervisor process: start, close, kill.

    No thread: the supervisor waits on the writer and restarts it, and
    publishes what happens in the shared state, which the handle reads.
    """

    def __init__(self, ctx: Any, config: WriterConfig, queue_size: int, policy: RestartPolicy):
        self.ctx = ctx
        self.config = config
        self.policy = policy
        self.sender = make_sender_token(os.getpid())
        self.state = new_shared_state(ctx)
        self.supervisor: Any = None  # its multiprocessing.Process
        # Callers may close from several threads; no thread of mpwriter's takes it.
        self._lock = threading.Lock()

        # The far ends (the request pipe's read end, the writer's end of the
        # registration socket) go to the supervisor, which hands them to each
        # writer: the queue outlives a dead writer.
        self.request_r: int | None
        self.request_r, self.request_w = os.pipe()
        _resize_pipe(self.request_w, queue_size)
        os.set_blocking(self.request_w, False)
        registration_writer, self.registration_client = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_DGRAM
        )
        self.registration_writer: socket.socket | None = registration_writer
        self.registration_client.setblocking(False)
        # The supervisor's lifeline: only this process holds the write end.
        self.control_r: int | None
        self.control_r, control_w = os.pipe()
        self.control_w: int | None = control_w
        # The supervisor holds the only write end: EOF here means it is gone.
        self.report: Connection | None = None
        # Where the supervisor listens for connect(), if anywhere.
        self.endpoint: EndpointConfig | None = None
        self._offered: EndpointOffer | None = None

    # -- starting ----------------------------------------------------------------------

    def launch(self, start_timeout: float) -> None:
        """Start the supervisor, which starts the writer; wait until it serves (or fails to)."""
        assert self.request_r is not None, "far ends already released"
        assert self.control_r is not None, "far ends already released"
        assert self.registration_writer is not None, "far ends already released"
        report_r, report_w = self.ctx.Pipe(duplex=False)
        self.report = report_r
        # The copies handed over are closed here once the supervisor has its
        # own, and a forked supervisor closes the owner's originals (see
        # forget_in_child).
        ends = FarEnds.duplicate(self.request_r, self.registration_writer, self.control_r, report_w)
        args = SupervisorArgs(self.config, ends, self.state, self.policy, self._offer())
        process = self.ctx.Process(
            target=supervise,
            name=f"mpwriter supervisor {os.path.basename(self.config.path)}",
            args=(args,),
            # Not a daemon: multiprocessing forbids daemons to have children.
            # close() and the lifeline end it; at exit, _close_at_exit runs
            # before multiprocessing joins its children.
            daemon=False,
        )
        try:
            start_child(process, ends)
        finally:
            self._close_offer()
        self.supervisor = process
        # The supervisor holds its own copies now; a writer death must show
        # to callers as EPIPE/EOF when no supervisor is left to replace it.
        self._release_far_ends()
        _await_ready(report_r, start_timeout + 2 * KILL_GRACE)

    def _offer(self) -> EndpointOffer | None:
        """The endpoint to open, with duplicates of the callers' ends (see `_close_offer`)."""
        if self.endpoint is None:
            return None
        request = Connection(os.dup(self.request_w), readable=False)
        self._offered = EndpointOffer(self.endpoint, request, self.registration_client.dup())
        return self._offered

    def _close_offer(self) -> None:
        """The supervisor holds its own copies of the offered ends now."""
        offered, self._offered = self._offered, None
        if offered is not None:
            offered.request.close()
            offered.registration.close()

    # -- stopping ----------------------------------------------------------------------

    def close(self, timeout: float) -> None:
        """Ask the writer to drain and stop; have it killed if it has not within ``timeout``.

        Returns within ``timeout`` seconds: the drain gets all of it but a
        reserve (a tenth, at most `_KILL_RESERVE`) in which the supervisor
        kills the writer and exits. Only a supervisor that does not answer
        within that reserve makes close() wait longer (logged), since killing
        it instead would leave a stuck writer holding the lock.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        reserve = min(_KILL_RESERVE, max(timeout, 0.0) / 10)
        with self._lock:
            state = self.state
            if state.status in (RUNNING, BACKING_OFF):
                state.status = CLOSED
                stop = CLOSE if self._send_close() else STOP  # a full queue: the lifeline
            else:
                stop = CLOSE
            self._tell(stop)
            if not self._await_supervisor(deadline - reserve - time.monotonic()):
                self._stop_by_force(deadline)
            self._forget_supervisor(deadline)
        _owners.discard(self)

    def _send_close(self) -> bool:
        key = self.config.frame_key
        (frame,) = encode_frames(Kind.CLOSE, self.sender, 0, NO_REPLY, b"", key)
        try:
            os.write(self.request_w, frame)
        except OSError:
            return False
        return True

    def _tell(self, command: bytes) -> None:
        if self.control_w is None:
            return
        # BrokenPipeError: the supervisor is gone already, nothing to tell.
        with contextlib.suppress(BrokenPipeError):
            os.write(self.control_w, command)

    def _await_supervisor(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until the supervisor has exited (its report pipe reads EOF)."""
        report = self.report
        if report is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            if not wait([report], max(deadline - time.monotonic(), 0.0)):
                return False
            try:
                report.recv_bytes()  # a late start-up report: nobody awaits it now
            except (EOFError, OSError):
                return True

    def _stop_by_force(self, deadline: float) -> None:
        """The writer did not stop in time: have it killed; kill the supervisor if need be."""
        self._tell(KILL)
        if self._await_supervisor(deadline - time.monotonic()):
            return
        log.warning(
            "mpwriter: close() waits past its timeout for the supervisor to kill the writer"
        )
        if not self._await_supervisor(4 * KILL_GRACE):
            log.error("mpwriter: the writer's supervisor did not exit; killing it")
            self.supervisor.kill()
            self._await_supervisor(KILL_GRACE)

    def _forget_supervisor(self, deadline: float | None = None) -> None:
        if self.control_w is not None:
            os.close(self.control_w)
            self.control_w = None
        if self.report is not None:
            self.report.close()
            self.report = None
        process = self.supervisor
        if process is not None:
            # Its report pipe has closed: it is exiting, which takes milliseconds.
            grace = KILL_GRACE if deadline is None else deadline - time.monotonic()
            process.join(min(KILL_GRACE, max(grace, _JOIN_AT_LEAST)))
            if process.exitcode is None:
                # Reaped by someone else (gunicorn's master calls waitpid(-1)):
                # multiprocessing would join or SIGTERM its pid at our exit.
                multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
        self._release_far_ends()

    def abandon(self) -> None:
        """Clean up after a failed first launch."""
        if self.supervisor is not None:
            self._tell(KILL + STOP)
            if not self._await_supervisor(4 * KILL_GRACE):
                self.supervisor.kill()
        self._forget_supervisor()
        os.close(self.request_w)
        self.registration_client.close()
        _owners.discard(self)

    def _release_far_ends(self) -> None:
        # Callers hold self._lock (or run single-threaded, after a fork): a
        # descriptor closed twice could close an unrelated one reusing its number.
        if self.registration_writer is not None:
            self.registration_writer.close()
            self.registration_writer = None
        for name in ("request_r", "control_r"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def forget_in_child(self) -> None:
        """In a forked child: this process owns nothing, and keeps no far end.

        A child holding the control pipe's write end would keep the
        supervisor alive after the owner's death; one holding a far end
        would keep a dead writer's callers from seeing EPIPE. (A forked
        supervisor uses its own duplicates, passed as its arguments.)
        """
        if self.control_w is not None:
            os.close(self.control_w)
            self.control_w = None
        if self.report is not None:
            self.report.close()
            self.report = None
        self._release_far_ends()
        if self.supervisor is not None:
            multiprocessing.process._children.discard(self.supervisor)  # type: ignore[attr-defined]


def _await_ready(report: Connection, timeout: float) -> None:
    """Raise unless the supervisor reports, within ``timeout``, that the writer is ready."""
    if not wait([report], timeout):
        raise WriterCrashed(f"the writer did not become ready within {timeout} s")
    try:
        status, value = pickle.loads(report.recv_bytes())
    except EOFError:
        # The supervisor died before it could report, in its own start-up: its
        # error went to stderr. Under spawn and forkserver the usual cause is a
        # script whose start() is not under the main guard (MissingMainGuard).
        raise WriterCrashed(
            "the writer's supervisor process ended before the writer was ready; its error, "
            "if any, is printed above (under the spawn and forkserver start methods, a "
            'start() that is not under `if __name__ == "__main__":` ends it so)'
        ) from None
    if status == "ready":
        return
    if status == "error":
        assert isinstance(value, BaseException)
        raise start_failure(value)
    if status == "timeout":
        raise WriterCrashed(f"the writer did not become ready: {value}")
    raise WriterCrashed(f"the writer process exited before it was ready (exit code {value})")


def _close_at_exit(
    ref: weakref.ref[Writer], owner_ref: weakref.ref[_Owner], timeout: float
) -> None:
    writer, owner = ref(), owner_ref()  # `_owners` holds the owner until it closes
    if writer is not None and writer._owner is not None:
        writer.close()
    elif writer is None and owner is not None and owner in _owners:
        # The handle was collected, the writer was not closed: it stops with
        # its owner all the same (multiprocessing would otherwise join the
        # supervisor, which waits for this process to close, forever).
        owner.close(timeout)


def _after_fork_in_child() -> None:
    for owner in list(_owners):
        owner.forget_in_child()
    _owners.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
