"""`mpwriter.dbapi.Cursor`: a DB-API cursor over its connection's routing.

The connection decides where a statement runs (the local reader, the writer,
its session) and hands back either the local `sqlite3.Cursor`, whose rows are
fetched lazily, or the writer's `Result`, whose rows came whole.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from .._errors import ProgrammingError
from .._wire.replies import Result
from .statements import local_error


class _Runs(Protocol):
    """What a cursor uses of its `mpwriter.dbapi.Connection`."""

    def _run(self, sql: str, params: Any) -> Result | sqlite3.Cursor: ...
    def _run_many(self, sql: str, seq_of_params: Iterable[Any]) -> Result: ...
    def _run_script(self, script: str) -> None: ...
    def _check_open(self) -> None: ...


class Cursor:
    """A DB-API cursor. Rows of a local read are fetched lazily from the reader;
    rows from the writer came whole with its reply."""

    arraysize: int

    def __init__(self, connection: Any) -> None:
        self.connection: _Runs = connection
        self.arraysize = 1
        self._local: sqlite3.Cursor | None = None
        self._rows: Iterator[tuple[Any, ...]] = iter(())
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None
        self._closed = False

    # -- executing ------------------------------------------------------------

    def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        """Run one statement (see the module docstring for where); return self."""
        self._check_open()
        self._reset()
        self._take(self.connection._run(sql, parameters))
        return self

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any]) -> Cursor:
        """Run one DML statement for each parameter set, atomically; return self."""
        self._check_open()
        self._reset()
        self._take(self.connection._run_many(sql, seq_of_parameters))
        return self

    def executescript(self, sql_script: str) -> Cursor:
        """Run a script of statements (as sqlite3: a pending transaction is committed first)."""
        self._check_open()
        self._reset()
        self.connection._run_script(sql_script)
        return self

    def _take(self, outcome: Result | sqlite3.Cursor) -> None:
        if isinstance(outcome, sqlite3.Cursor):
            self._local = outcome
            self._description = outcome.description
            self._rowcount = outcome.rowcount
            return
        self._rows = iter(outcome.rows)
        self._description = outcome.description
        self._rowcount = outcome.rowcount
        if outcome.lastrowid is not None:
            self._lastrowid = outcome.lastrowid

    def _reset(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        self._rows = iter(())
        self._description = None
        self._rowcount = -1

    # -- results --------------------------------------------------------------

    @property
    def description(self) -> Any:
        """7-tuples with the column name first (the rest None); None without rows."""
        return self._description

    @property
    def rowcount(self) -> int:
        """Rows changed by the last DML statement (its total for executemany); -1 otherwise."""
        return self._rowcount

    @property
    def lastrowid(self) -> int | None:
        """The rowid of the last row this cursor inserted through the writer."""
        return self._lastrowid

    def fetchone(self) -> tuple[Any, ...] | None:
        """The next row, or None."""
        self._check_open()
        if self._local is not None:
            try:
                row: tuple[Any, ...] | None = self._local.fetchone()
            except sqlite3.Error as exc:
                raise local_error(exc) from None
            return row
        return next(self._rows, None)

    def fetchmany(self, size: int | None = None) -> list[tuple[Any, ...]]:
        """Up to ``size`` (default ``arraysize``) next rows."""
        self._check_open()
        count = self.arraysize if size is None else size
        if self._local is not None:
            try:
                return self._local.fetchmany(count)
            except sqlite3.Error as exc:
                raise local_error(exc) from None
        return [row for _, row in zip(range(count), self._rows, strict=False)]

    def fetchall(self) -> list[tuple[Any, ...]]:
        """Every remaining row."""
        self._check_open()
        if self._local is not None:
            try:
                return self._local.fetchall()
            except sqlite3.Error as exc:
                raise local_error(exc) from None
        return list(self._rows)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self

    def __next__(self) -> tuple[Any, ...]:
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    def close(self) -> None:
        """Close the cursor: its pending rows are dropped; ``rowcount`` and
        ``lastrowid`` keep their values (SQLAlchemy reads them after closing)."""
        if self._local is not None:
            self._local.close()
            self._local = None
        self._rows = iter(())
        self._closed = True

    def setinputsizes(self, sizes: Sequence[Any]) -> None:
        """Does nothing (PEP 249 allows it)."""

    def setoutputsize(self, size: int, column: int | None = None) -> None:
        """Does nothing (PEP 249 allows it)."""

    def _check_open(self) -> None:
        if self._closed:
            raise ProgrammingError("Cannot operate on a closed cursor.")
        self.connection._check_open()
