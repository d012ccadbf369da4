"""What the fault tools and the test suite share: the table they write, and reaping."""

from __future__ import annotations

from multiprocessing.connection import wait
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    client INTEGER,
    seq INTEGER,
    payload TEXT,
    UNIQUE (client, seq)
);
"""
INSERT = "INSERT INTO items(client, seq) VALUES (?, ?)"


def reap(process: Any, timeout: float = 10.0) -> None:
    """Join a child with escalation: wait, terminate, kill; never hang.

    Not join(0) after the sentinel fires: the sentinel fires as the child
    closes its descriptors, a moment before its exit status can be collected
    (waitpid(WNOHANG) would leave exitcode None and a zombie behind).
    """
    for stop in (None, process.terminate, process.kill):
        if stop is not None:
            stop()
        if wait([process.sentinel], timeout):
            process.join(timeout)
            return
    raise RuntimeError(f"process {process.pid} would not die")
