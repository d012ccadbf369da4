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
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar, overload

from .._wire.address import is_server_url

_R = TypeVar("_R", bound="Reader")


class ReaderCursor(Protocol):
    """The reading half of a DB-API cursor: what `Reader.execute` returns on both engines."""

    @property
    def description(self) -> Any: ...
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchmany(self, size: int = ..., /) -> list[Any]: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Reader(Protocol):
    """What `reader` returns whichever the engine: a read-only connection to
    execute reads on and close (a ``with`` block closes it).

    On SQLite it is a `ReadConnection` (a `sqlite3.Connection`; placeholders
    ``?``), on PostgreSQL a psycopg connection (placeholders ``%s``). Narrow it
    with ``isinstance(db, mpwriter.ReadConnection)`` to use what only
    `sqlite3` has, or pass `reader` an `os.PathLike`, which is typed as a
    `ReadConnection`.
    """

    def execute(self, sql: str, parameters: Any = ..., /) -> ReaderCursor: ...
    def close(self) -> None: ...
    def __enter__(self: _R) -> _R: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> bool | None: ...


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


@overload
def reader(
    path: os.PathLike[str], *, busy_timeout: float = 5.0, check_same_thread: bool = True
) -> ReadConnection: ...
@overload
def reader(path: str, *, busy_timeout: float = 5.0, check_same_thread: bool = True) -> Reader: ...
def reader(
    path: str | os.PathLike[str], *, busy_timeout: float = 5.0, check_same_thread: bool = True
) -> Reader:
    """Open a read-only connection to ``path`` (``mode=ro`` and ``query_only``).

    For a PostgreSQL URL (``postgresql://`` or ``postgres://``) it returns a
    psycopg connection whose transactions are read-only
    (``default_transaction_read_only``); its ``with`` block also closes it.
    Typed as a `Reader` for a ``str`` (a path or a URL), as a `ReadConnection`
    for an `os.PathLike` (always a file).

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
