"""Handing the writer side's ends to a child process: the supervisor, or a writer.

The owner starts the supervisor, and the supervisor each writer, with the
same four ends: the request pipe's read end, the writer's end of the
registration socket, a lifeline whose EOF means "stop", and a pipe on which
the child reports how its start went. The parent hands over duplicates, so
that its own copies stay its own (the queue outlives a dead writer), and
closes the duplicates once the child holds its copies -- whether it started
or not, so that no end leaks into the parent.
"""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection
from typing import Any, NamedTuple


class FarEnds(NamedTuple):
    """The ends a child process serves with, in the order `serve` takes them."""

    requests: Connection  # the request pipe's read end
    registrations: socket.socket  # the writer's end of the registration socket
    lifeline: Connection  # a read end whose EOF means "stop"
    report: Connection  # where the child says how its start went

    @classmethod
    def duplicate(
        cls, requests: int, registrations: socket.socket, lifeline: int, report: Connection
    ) -> FarEnds:
        """Duplicates of the first three to hand over, with the child's own
        ``report`` end (made for it: handed over as it is)."""
        return cls(
            Connection(os.dup(requests), writable=False),
            registrations.dup(),
            Connection(os.dup(lifeline), writable=False),
            report,
        )

    def close(self) -> None:
        for end in self:
            end.close()


def start_child(process: Any, ends: FarEnds) -> None:
    """Start ``process`` (a `multiprocessing.Process` given ``ends``); close
    ``ends`` here once it has its own copies, or failed to start."""
    try:
        process.start()
    finally:
        ends.close()
