"""One process serves: a child forked from the writer can never be a second writer.

A `call()` function (or an ``init`` callable) runs in the writer's own
process and may fork: directly, through multiprocessing's fork start method,
or inside a library. The child is a copy of the writer, in the middle of its
transaction; returning into the writer's code it would read requests, answer
them and COMMIT beside the real writer (replies to the wrong requests,
acknowledged writes lost). Two measures, both set up by `become_writer`:

- First thing in the child (``os.register_at_fork``), the writer's
  descriptors there are replaced by /dev/null (numbers kept, so that nothing
  reuses them): every file the writer process had open when it became the
  writer (the request pipe, the side socket, the lifeline, the writer's end of
  its supervisor's sentinel...) and every file it named since with
  `forbid_in_child` (the database and its lock file, whose flock locks a child
  would otherwise keep held); then the actions the writer registered with
  `in_forked_child` run: every reply pipe and held payload is blanked too,
  SIGTERM gets its default action back, and the SQLite engine's connection
  refuses every statement. Files are told by identity (device and inode), not
  by number: a number the writer closed may since name a file of the
  function's own, which its child keeps. A child that lives on (a
  multiprocessing worker, a daemon) holds nothing of the writer's: callers
  still see EOF on their reply pipes, the supervisor its sentinel, when the
  writer dies, and the writer's successor can claim the database.
- Control coming back into the writer's code in a process that is not the
  writer (`leave_if_forked`: after each call() function, after each batch,
  after opening the engine) ends that process at once with `os._exit`,
  before it can answer or commit anything.

A child that execs (``subprocess``) or ends with ``os._exit`` (the fork start
method's children do, after their target) never meets the second measure.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterable

# The exit status of a forked child that came back into the writer's code.
FORKED_CHILD_EXIT = 70  # EX_SOFTWARE
_STANDARD_STREAMS = 3  # 0, 1, 2 stay: a child may print


class _Guard:
    """This process's part: set by `become_writer`, in the writer process only."""

    def __init__(self) -> None:
        self.writer_pid: int | None = None
        self.child_actions: list[Callable[[], object]] = []
        # (st_dev, st_ino) of the files a child must not keep open.
        self.forbidden: set[tuple[int, int]] = set()
        self.signal_mask: set[int] = set()  # the forking thread's, during a fork


_guard = _Guard()


def become_writer() -> None:
    """Mark this process as the writer; guard every fork it makes from now on."""
    if _guard.writer_pid is None:
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_in_parent,
            after_in_child=_after_fork_in_child,
        )
    _guard.writer_pid = os.getpid()
    _guard.child_actions = []
    _guard.forbidden = set(_open_files().values())


def forbid_in_child(*files: int | str) -> None:
    """Have a child forked from this writer let go of ``files``.

    Each is an open descriptor or a path (not followed if a symlink). Every
    descriptor of those files in the child is blanked, whatever its number.
    Does nothing outside the writer process.
    """
    if _guard.writer_pid is not None and _guard.writer_pid == os.getpid():
        _guard.forbidden.update(
            _identity(os.fstat(f) if isinstance(f, int) else os.lstat(f)) for f in files
        )


def in_forked_child(action: Callable[[], object]) -> None:
    """Have ``action`` run first thing in a child forked from this writer.

    Does nothing outside the writer process (an engine or loop driven by a
    test in its own process registers nothing there).
    """
    if _guard.writer_pid is not None and _guard.writer_pid == os.getpid():
        _guard.child_actions.append(action)


def leave_if_forked() -> None:
    """End this process at once if it is a child forked from the writer.

    Called where control comes back into the writer's code from code it does
    not control: the child must not answer, read or commit anything.
    """
    writer_pid = _guard.writer_pid
    if writer_pid is not None and os.getpid() != writer_pid:
        with contextlib.suppress(OSError):
            os.write(
                2,
                f"mpwriter: process {os.getpid()}, forked inside the writer (pid"
                f" {writer_pid}) by a call() function, came back into the writer's"
                " code; it exits here, having answered and committed nothing\n".encode(),
            )
        os._exit(FORKED_CHILD_EXIT)


def _identity(info: os.stat_result) -> tuple[int, int]:
    return (info.st_dev, info.st_ino)


def _open_files() -> dict[int, tuple[int, int]]:
    """This process's open descriptors above the standard streams, each with
    the identity of its file.

    One fstat per descriptor: a descriptor may close between the listing and
    its fstat (the listing's own, or one a finalizer closes), and is then
    left out.
    """
    found = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd >= _STANDARD_STREAMS:
            try:
                found[fd] = _identity(os.fstat(fd))
            except OSError:
                continue
    return found


def _blank_forbidden() -> None:
    forbidden = _guard.forbidden
    blank(fd for fd, identity in _open_files().items() if identity in forbidden)


def blank(fds: Iterable[int]) -> None:
    """Point each of ``fds`` at /dev/null, keeping the numbers in use."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in fds:
            if fd >= 0 and fd != null:
                os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


# SIGTERM is held back across a fork: the child inherits the writer's handler,
# which only asks the writer loop to close, until its actions put the default
# back; a SIGTERM that came in between (multiprocessing's terminate() right
# after start()) would be taken by the old handler and lost. Held back, it is
# delivered once the child has the default handler, and ends it.
_HELD_BACK = frozenset({signal.SIGTERM})


def _before_fork() -> None:
    if _guard.child_actions:
        _guard.signal_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_BACK)


def _after_fork_in_parent() -> None:
    if _guard.child_actions:
        signal.pthread_sigmask(signal.SIG_SETMASK, _guard.signal_mask)


def _after_fork_in_child() -> None:
    # Once, in a direct child of the writer: its own children find the list
    # empty (their parent has replaced these numbers, and may reuse them).
    actions, _guard.child_actions = _guard.child_actions, []
    if not actions:
        return
    try:
        _blank_forbidden()
        for action in actions:
            action()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, _guard.signal_mask)
