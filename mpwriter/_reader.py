"""Read-only connections for the caller's own reads.

Reads need no writer: in WAL mode any number of readers run beside the one
writer without blocking it or being blocked. A write call returns only after
its COMMIT, so a read started after the call returned sees the write, in any
process (read-your-writes).
"""

from __future__ import annotations

import os
import pathlib
import sqlite3


def reader(path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> sqlite3.Connection:
    """Open a read-only connection to ``path`` (``mode=ro`` and ``query_only``).

    Writes through it fail with `sqlite3.OperationalError`. Each call opens a
    new connection; close it when done. Use one connection per thread.
    """
    uri = pathlib.Path(os.fspath(path)).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout)
    conn.execute("PRAGMA query_only=ON")
    return conn
