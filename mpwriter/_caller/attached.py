"""A process-wide writer for pool workers: `attach` as initializer, `get_writer` in tasks.

Pool tasks cannot take a Writer as an argument (file descriptors travel only
when a process is created), so the handle goes in the pool's initializer
arguments and tasks fetch it with `get_writer()`.
"""

from __future__ import annotations

from .._errors import Error
from .handle import Writer

# One slot per process; a forked child inherits it, which is what a
# fork-started pool worker wants.
_attached: list[Writer] = []


def attach(writer: Writer) -> None:
    """Make ``writer`` this process's writer; use as a pool ``initializer``.

    ``ProcessPoolExecutor(initializer=mpwriter.attach, initargs=(writer,))``
    """
    _attached[:] = [writer]


def get_writer() -> Writer:
    """The writer given to `attach` in this process (or inherited through fork).

    Raises `mpwriter.Error` if none was attached.
    """
    if not _attached:
        raise Error("no writer attached in this process: call mpwriter.attach(writer) first")
    return _attached[0]
