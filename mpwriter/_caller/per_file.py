"""The handle a process uses for a database file: one per file, shared by its threads.

`mpwriter.dbapi` and `mpwriter.django` both ask `handle_for`, so a process
that uses both holds one handle per file, and both find the handle attached
to the process (`mpwriter.attach`) first. What to do when the process has
none is theirs to say (connect only, or start a writer if none serves).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from .._errors import Error
from .attached import get_writer
from .handle import Writer


class _Kept:
    """The handles made through `handle_for`, by absolute path, and their lock.

    The lock is held while a handle is made: threads asking for one file at
    once make one handle between them. A forked child inherits the handles
    (a handle works in the children of the process that has it), not the lock.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handles: dict[str, Writer] = {}


_kept = _Kept()


def handle_for(path: str, make: Callable[[], Writer]) -> Writer:
    """The handle this process uses for the database file ``path``.

    In order: the handle attached to this process (`mpwriter.attach`,
    inherited through fork) if it serves ``path``; the handle an earlier call
    made for the file, unless it was closed; else ``make()``, kept for the
    calls after this one. Raises what ``make`` raises, keeping nothing.
    """
    key = os.path.abspath(path)
    try:
        attached: Writer | None = get_writer()
    except Error:
        attached = None
    if attached is not None and same_database(attached.path, key):
        return attached
    with _kept.lock:
        handle = _kept.handles.get(key)
        if handle is None or handle.closed:
            handle = _kept.handles[key] = make()
        return handle


def forget(path: str) -> Writer | None:
    """Stop keeping the handle made for ``path`` and return it (None if none was made)."""
    with _kept.lock:
        return _kept.handles.pop(os.path.abspath(path), None)


def same_database(a: str, b: str) -> bool:
    """Whether the paths ``a`` and ``b`` name one file (symlinks and hard links included)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _new_lock_in_child() -> None:
    # A thread of the parent may have held the lock, making a handle, at the
    # fork: the child has no such thread, and would wait for it forever.
    _kept.lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)
