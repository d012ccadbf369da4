"""gunicorn integration: one writer per gunicorn master, shared by all its workers.

In ``gunicorn.conf.py``::

    import mpwriter.gunicorn

    on_starting, on_exit = mpwriter.gunicorn.writer_hooks("app.db", init=SCHEMA)

and in the app, inside a request::

    mpwriter.get_writer().execute("INSERT INTO hits(path) VALUES (?)", (path,))

`on_starting` runs in the master before it binds its sockets or forks any
worker: it starts the writer and `mpwriter.attach`-es it, so every worker --
the first ones, replacements after a crash, a kill, ``max_requests`` or a HUP
-- inherits the handle through ``fork``. `on_exit` runs in the master after its
workers have stopped: it closes the writer, which serves what is queued,
commits, checkpoints and releases its lock file.

What the rest of gunicorn's life does to the writer:

- A worker's exit, however it happens (SIGKILL, SIGABRT after ``timeout``,
  ``max_requests``, graceful stop), never stops or disturbs the writer: a
  forked child owns nothing, and mpwriter's fork hooks make it drop the
  writer from its multiprocessing records. A request in flight when its
  worker dies may still be committed: its client saw no response.
- The master reaps its children with ``waitpid(-1)``. The writer is not one
  of them: it is the child of mpwriter's supervisor process (the master's
  child), which reaps it, restarts it (see `mpwriter.start`'s ``restart``)
  and runs the watchdog. The master gets no thread from mpwriter, so its
  forks of workers are forks of a single-threaded process.
- mpwriter's log records (a writer that died, a restart) go to gunicorn's
  error log unless logging was configured for them.
- HUP re-reads this configuration and replaces the workers; the writer keeps
  running (a new `writer_hooks` call just makes new, equivalent hooks: the
  started writer lives in this module). Changed writer arguments take effect
  at the next start.
- USR2 starts a second master beside the first. The lock file decides: the
  new master waits up to ``takeover_timeout`` seconds, before starting any
  writer or worker, for the old writer to release the lock -- it does once the
  old master exits (TERM it after the USR2). If the old writer still holds it
  then, the new master exits with `mpwriter.WriterAlreadyRunning` and the old
  one keeps serving. Two writers never run at once. On PostgreSQL (a
  ``postgresql://`` URL) there is no lock: the new master starts its writer
  at once, beside the old one.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from ._caller.attached import attach
from ._caller.handle import Writer
from ._errors import WriterAlreadyRunning
from ._owner.owner import start
from ._wire.address import is_server_url
from ._writer.claim import await_release, lock_path

__all__ = ["Hooks", "writer_hooks"]

# The writer this process started: module state, not closure state, because
# HUP re-executes gunicorn.conf.py and so replaces the hook functions.
_started: list[Writer] = []


class _Log(Protocol):
    def info(self, msg: str, *args: Any) -> None: ...

    def error(self, msg: str, *args: Any) -> None: ...


class Arbiter(Protocol):
    """What the hooks use of gunicorn's ``Arbiter`` (the ``server`` argument)."""

    log: _Log
    master_pid: int  # nonzero in the new master of a USR2 upgrade: the old one's pid


class Hooks(NamedTuple):
    """The two server hooks: assign them to the names gunicorn looks for."""

    on_starting: Callable[[Arbiter], None]
    on_exit: Callable[[Arbiter], None]


def writer_hooks(
    path: str | os.PathLike[str],
    *,
    takeover_timeout: float = 60.0,
    **start_kwargs: Any,
) -> Hooks:
    """Hooks that run one writer for ``path`` in the gunicorn master.

    ``start_kwargs`` are `mpwriter.start`'s keyword arguments; they are checked
    here, so that a typo fails when gunicorn reads its configuration.

    ``on_starting(server)`` starts the writer and attaches it, so workers get
    it with `mpwriter.get_writer()` (call it in a request: with ``preload_app``
    the app is imported before ``on_starting``). It raises what `start` raises,
    which makes gunicorn exit: `WriterAlreadyRunning` if another writer serves
    ``path`` -- at once for a fresh master, after ``takeover_timeout`` seconds
    for the new master of a USR2 upgrade, which waits for the old writer.

    ``on_exit(server)`` closes the writer: everything already queued is
    committed, then the writer exits and releases the lock file. Both hooks
    are plain functions of ``server``, callable from hooks of your own.
    """
    inspect.signature(start).bind(path, **start_kwargs)
    if takeover_timeout < 0:
        raise ValueError("takeover_timeout must not be negative")

    def on_starting(server: Arbiter) -> None:
        _route_records_to_gunicorn()
        try:
            # PostgreSQL admits writers side by side: a USR2 successor need not wait.
            postgres = is_server_url(os.fspath(path))
            if server.master_pid and not postgres:
                _await_old_writer(os.fspath(path), takeover_timeout, server)
            writer = start(path, **start_kwargs)
        except WriterAlreadyRunning as exc:
            server.log.error("mpwriter: this gunicorn master cannot start: %s", exc)
            raise
        _started.append(writer)
        attach(writer)
        server.log.info("mpwriter: writer (pid %s) serves %s", writer.stats()["pid"], writer.path)

    def on_exit(server: Arbiter) -> None:
        while _started:
            writer = _started.pop()
            writer.close()
            server.log.info("mpwriter: writer for %s closed", writer.path)

    return Hooks(on_starting, on_exit)


def _await_old_writer(path: str, timeout: float, server: Arbiter) -> None:
    """In a USR2 master: wait until the old master's writer has released its lock.

    Waiting here, before `start`, keeps the new master from starting workers
    that would have no writer; the old master serves meanwhile, and once it
    exits, new connections wait in the listen backlog this master inherited.
    """
    if await_release(path, 0):
        return
    held = lock_path(path)
    server.log.info(
        "mpwriter: the writer of the old master (pid %s) holds %s; waiting up to %s s"
        " for it to exit (stop the old master to hand over)",
        server.master_pid,
        held,
        timeout,
    )
    began = time.monotonic()
    if not await_release(path, timeout):
        raise WriterAlreadyRunning(
            f"the old master (pid {server.master_pid}) still runs a writer for {path!r}"
            f" after {timeout} s, and serves on (to hand over, stop it after its USR2)"
        )
    server.log.info(
        "mpwriter: the old writer released %s after %.1f s", held, time.monotonic() - began
    )


class _ToGunicornErrorLog(logging.Handler):
    """Hands mpwriter's records to gunicorn's error log, as configured now.

    Looked up at each record: HUP replaces that logger's handlers.
    """

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("gunicorn.error").handle(record)


def _route_records_to_gunicorn() -> None:
    # Without a handler, mpwriter's warnings (a writer that died, a restart)
    # would reach only stderr, which a daemonized gunicorn sends to /dev/null.
    # Installed before the writer starts, so that a forked writer has it too.
    logger = logging.getLogger("mpwriter")
    if not logger.hasHandlers():
        logger.addHandler(_ToGunicornErrorLog())
