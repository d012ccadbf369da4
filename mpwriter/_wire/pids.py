"""Whether a process named by its pid is alive: for the writer (a caller's
sender token names its pid) and for ``python -m mpwriter stats`` (a
snapshot names its writer's pid)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True unless no process has this pid (one of another user's counts as alive).

    A pid can be reused by an unrelated process: True means "maybe", False
    means "gone".
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
