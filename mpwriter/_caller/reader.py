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
from types import TracebackType
from typing import Any, Literal

from .._wire.address import is_server_url


class ReadConnection(sqlite3.Connection):
    """A `sqlite3.Connection` that a ``with`` block also closes.

    (A plain sqlite3 connection's ``with`` only ends a transaction, which for
    a read-only connection is rarely what the reader meant.)
    """

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        super().__exit__(exc_type, exc, tb)
        self.close()
        return False


def reader(
    path: str | os.PathLike[str], *, busy_timeout: float = 5.0, check_same_thread: bool = True
) -> Any:
    """Open a read-only connection to ``path`` (``mode=ro`` and ``query_only``).

    For a PostgreSQL URL (``postgresql://`` or ``postgres://``) it returns a
    psycopg connection whose transactions are read-only
    (``default_transaction_read_only``); its ``with`` block also closes it.

    Writes through it fail with `sqlite3.OperationalError`. Each call opens a
    new connection: use it in a ``with`` block, which closes it, or close it
    yourself. Use one connection per thread (``check_same_thread=False``
    lets a connection move between threads, used by one at a time; SQLite only).
    """
    if isinstance(path, str) and is_server_url(path):
        # Imported here: psycopg is an optional dependency (mpwriter[postgres]).
        import psycopg

        return psycopg.connect(path, options="-c default_transaction_read_only=on")
    uri = pathlib.Path(os.fspath(path)).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(
        uri,
        uri=True,
        timeout=busy_timeout,
        factory=ReadConnection,
        check_same_thread=check_same_thread,
    )
    conn.execute("PRAGMA query_only=ON")
    return conn
