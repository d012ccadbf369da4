"""State shared by the owner, the writer and every caller, in shared memory.

One small ctypes structure (no lock: each field has a single writer, and a
reader only needs a recent value). Callers read it to word their errors
("closed" or "died"), the writer publishes what it is busy with so that the
owner's watchdog can tell a hang, and the owner publishes restarts.
"""

from __future__ import annotations

import ctypes
from typing import Any

# Values of SharedState.status
RUNNING = 0
CLOSED = 1  # closed on purpose: close(), SIGTERM, or the owner is gone
DEAD = 2  # died, and the owner will not (or may no longer) restart it


class SharedState(ctypes.Structure):
    """Lives in shared memory; create with `new_shared_state`."""

    _fields_ = (
        ("status", ctypes.c_int),
        ("generation", ctypes.c_int),  # +1 for every writer process started
        ("restarts", ctypes.c_int),
        ("writer_pid", ctypes.c_int),
        ("last_exit", ctypes.c_int),  # exit code of the last writer that died
        ("busy_until", ctypes.c_double),  # monotonic; 0.0 while idle
    )


def new_shared_state(ctx: Any) -> Any:
    """A zeroed `SharedState` in shared memory, picklable to children at start."""
    return ctx.RawValue(SharedState)


# last_exit when the exit status was taken by someone else (a parent that
# reaps every child itself, as gunicorn's master does).
EXIT_UNKNOWN = -1000


def describe_exit(code: int) -> str:
    if code == EXIT_UNKNOWN:
        return "died (its exit status was reaped elsewhere)"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with status {code}"
