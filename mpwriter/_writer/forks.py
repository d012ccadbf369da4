"""One process serves: a child forked from the writer can never be a second writer.

A `call()` function (or an ``init`` callable) runs in the writer's own
process and may fork: directly, through multiprocessing's fork start method,
or inside a library. The child is a copy of the writer, in the middle of its
transaction; returning into the writer's code it would read requests, answer
them and COMMIT beside the real writer (replies to the wrong requests,
acknowledged writes lost). Two measures, both set up by `become_writer`:

- First thing in the child (``os.register_at_fork``), the actions the writer
  registered with `in_forked_child` run: its descriptors there -- the request
  pipe, the side socket, every reply pipe and held payload, the lifeline, the
  writer's end of its supervisor's sentinel (`own_sentinel`) -- are replaced
  by /dev/null (numbers kept, so that nothing reuses them), SIGTERM gets its
  default action back, and the SQLite engine's connection refuses every
  statement. A child that lives on (a multiprocessing worker, a daemon) holds
  nothing of the writer's: callers still see EOF on their reply pipes, and
  the supervisor its sentinel, when the writer dies.
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
import sys
from collections.abc import Callable, Iterable

# The exit status of a forked child that came back into the writer's code.
FORKED_CHILD_EXIT = 70  # EX_SOFTWARE
_POPEN_FORK = "multiprocessing.popen_fork"


class _Guard:
    """This process's part: set by `become_writer`, in the writer process only."""

    def __init__(self) -> None:
        self.writer_pid: int | None = None
        self.child_actions: list[Callable[[], object]] = []
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


def own_sentinel() -> int | None:
    """This process's end of its multiprocessing sentinel, if it has one.

    A process started by multiprocessing's fork start method holds the write
    end of a pipe whose read end is its parent's sentinel: the parent (the
    supervisor) sees this process end when every copy of that end is closed.
    A child forked from this process holds a copy, so it must be blanked
    there, or the writer's death would go unnoticed while the child lives.
    multiprocessing keeps that end only as a local of the frame that forked
    (``popen_fork.Popen._launch``), below this one on the stack; None if
    this process was not started that way.
    """
    frame = sys._getframe()
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_launch" and frame.f_globals.get("__name__") == _POPEN_FORK:
            fd = frame.f_locals.get("child_w")
            return fd if isinstance(fd, int) else None
        frame = frame.f_back  # type: ignore[assignment]
    return None


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
        for action in actions:
            action()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, _guard.signal_mask)
