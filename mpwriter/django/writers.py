"""Which writer a Django process uses for a database file, and what it needs.

The one place that decides: `writer_for`. The order is

1. the handle attached to this process (`mpwriter.attach`, inherited by
   gunicorn's workers from the master's ``on_starting`` hook), if it serves
   the file;
2. the handle this process got earlier for the file (a process keeps one per
   file, shared by its threads' connections and by `mpwriter.dbapi`'s:
   `mpwriter._caller.per_file`);
3. `mpwriter.start_or_connect`: a handle on the writer another process
   serves the file with (a gunicorn master, ``python -m mpwriter serve``,
   another ``manage.py`` command), connected through its endpoint; or, if
   none serves it, a writer this process starts with `writer_init`, owns,
   and closes when it exits.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from typing import Any

from .._caller import per_file
from .._caller.handle import Writer
from .._owner.either import start_or_connect


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
    """The writer handle this process uses for the database file ``path`` (see the module).

    ``start_options`` go to `mpwriter.start` if this process starts the
    writer (``init`` defaults to `writer_init`). Raises what
    `mpwriter.start_or_connect` raises (`WriterUnavailable`, `AccessDenied`).
    """
    start_options.setdefault("init", writer_init)
    start = functools.partial(start_or_connect, os.path.abspath(path), **start_options)
    return per_file.handle_for(path, start)


def close_writer(path: str) -> None:
    """Close the handle this process got for ``path`` through `writer_for`, if any.

    A writer this process started is stopped: it commits what it was sent,
    then releases the file (Django's test runner calls this before deleting
    a test database); a connected handle is only released.
    """
    writer = per_file.forget(path)
    if writer is not None:
        writer.close()
