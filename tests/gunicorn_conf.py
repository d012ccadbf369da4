"""gunicorn.conf.py for tests/test_gunicorn.py: the README's recipe plus test plumbing.

The test passes its database, the USR2 takeover deadline, whether to restart
a dead writer and an event FIFO through the environment (a USR2 successor
inherits it too).
"""

from __future__ import annotations

import os
from typing import Any

import mpwriter.gunicorn
from gunicorn_app import SCHEMA

# The README's recipe.
on_starting, on_exit = mpwriter.gunicorn.writer_hooks(
    os.environ["MPWRITER_TEST_DB"],
    init=SCHEMA,
    timeout=10.0,
    takeover_timeout=float(os.environ["MPWRITER_TEST_TAKEOVER_TIMEOUT"]),
    restart=os.environ["MPWRITER_TEST_RESTART"] == "1",
)

# Test plumbing. gunicorn >= 27 would otherwise open a control socket in $HOME
# (older versions ignore the unknown name).
control_socket_disable = True


def pre_exec(server: Any) -> None:
    """In a USR2 successor, just before it execs: its pid is the new master's."""
    _event(f"exec {os.getpid()}")


def when_ready(server: Any) -> None:
    _event(f"ready {os.getpid()}")


def _event(line: str) -> None:
    # The test holds the FIFO open for reading, so this open never blocks, and
    # a line shorter than PIPE_BUF arrives whole.
    fifo = os.open(os.environ["MPWRITER_TEST_EVENTS"], os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fifo, f"{line}\n".encode())
    finally:
        os.close(fifo)
