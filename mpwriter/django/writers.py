"""Which writer a Django process uses for a database file, and what it needs.

The one place that decides: `writer_for`. The order is

1. the handle attached to this process (`mpwriter.attach`, inherited by
   gunicorn's workers from the master's ``on_starting`` hook), if it serves
   the file;
2. a writer this process started earlier for the file;
3. ``mpwriter.connect(path)`` (a handle on a writer another process tree
   started), where this version of mpwriter has it;
4. otherwise this process starts one (`mpwriter.start`) with `writer_init`,
   owns it, and closes it at exit. A second process that finds the file's
   writer lock taken, with no way to connect to it, gets
   `ImproperlyConfigured` saying so.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

from .._caller.attached import get_writer
from .._caller.handle import Writer
from .._errors import Error, WriterAlreadyRunning
from .._owner.owner import start
from ..dbapi import _same_database

_lock = threading.Lock()
# Writers this process started, by absolute path: it owns them.
_started: dict[str, Writer] = {}


def writer_init(conn: sqlite3.Connection) -> None:
    """A writer's ``init``: registers the SQL functions Django's SQLite backend
    puts on each of its connections (date extraction and truncation, regexp,
    math, hashes...) and its parameter adapters (Decimal, date, datetime).

    Pass it to `mpwriter.start` or `mpwriter.gunicorn.writer_hooks` for a
    writer that serves a Django project: ``init=mpwriter.django.writer_init``.
    """
    # Importing the backend registers Django's adapters on this process's sqlite3.
    from django.db.backends.sqlite3 import base  # type: ignore[import-untyped]
    from django.db.backends.sqlite3._functions import register  # type: ignore[import-untyped]

    del base
    register(conn)


def writer_for(path: str, **start_options: Any) -> Writer:
    """The writer this process uses for the database file ``path`` (see the module).

    ``start_options`` go to `mpwriter.start` if this process starts the
    writer (``init`` defaults to `writer_init`).
    """
    key = os.path.abspath(path)
    try:
        attached: Writer | None = get_writer()
    except Error:
        attached = None
    if attached is not None and _same_database(attached.path, key):
        return attached
    with _lock:
        mine = _started.get(key)
        if mine is not None and not mine.closed:
            return mine
        import mpwriter

        connect_to = getattr(mpwriter, "connect", None)
        if connect_to is not None:
            connected: Writer = connect_to(key)
            return connected
        start_options.setdefault("init", writer_init)
        try:
            writer = start(key, **start_options)
        except WriterAlreadyRunning as exc:
            from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]

            raise ImproperlyConfigured(
                f"another process runs the writer of {key!r} and this process has no handle"
                " on it: run this command in that process tree (attach its handle with"
                " mpwriter.attach), or stop it first (see docs/django.md)"
            ) from exc
        _started[key] = writer
        return writer


def close_started(path: str) -> None:
    """Close the writer this process started for ``path``, if it started one.

    Waits until it has committed what it was sent and released the file
    (Django's test runner calls it before deleting a test database).
    """
    with _lock:
        writer = _started.pop(os.path.abspath(path), None)
    if writer is not None:
        writer.close()
