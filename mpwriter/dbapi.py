"""A PEP 249 (DB-API 2.0) module over the writer, modelled on `sqlite3`.

    conn = mpwriter.dbapi.connect("app.db")     # uses this process's writer handle
    conn.execute("INSERT INTO t(x) VALUES (?)", (1,))   # opens a transaction, as sqlite3 does
    conn.commit()                                # returns once group-committed

Where each statement runs:

* outside a transaction, a read runs on this connection's own read-only
  SQLite connection (no writer round trip); a write goes to the writer as one
  request (atomic, durable when the call returns);
* inside a transaction, every statement (reads included) runs in this
  connection's writer session (`Writer.session()`), so the transaction reads
  its own writes; `commit()` returns once the group COMMIT holding it is
  durable.

Transactions follow the `sqlite3` module: in its default ("legacy") mode an
INSERT/UPDATE/DELETE/REPLACE outside a transaction opens one implicitly
(``isolation_level`` ``""``, ``"DEFERRED"``, ``"IMMEDIATE"`` or
``"EXCLUSIVE"``: the writer serializes sessions, so all behave like
IMMEDIATE), and ``isolation_level=None`` is autocommit. The ``autocommit``
attribute of Python 3.12 is honoured on every Python: ``True`` is SQLite's
autocommit mode (explicit ``BEGIN`` only), ``False`` keeps a transaction
open at all times (PEP 249's model).

What a statement does is asked of SQLite, never guessed from its text (see
`mpwriter._caller.statements`: the local connection's authorizer callback).

Limits (see docs/orm.md): functions, aggregates and collations registered on
a connection exist on its local reader only, not in the writer; ``PRAGMA``
statements outside a transaction set the local reader's state only;
temporary tables are not supported; a PostgreSQL writer is refused
(`NotSupportedError`).
"""

from __future__ import annotations

import datetime
import functools
import os
import pathlib
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from . import _errors
from ._caller.cursor import Cursor
from ._caller.per_file import handle_for, same_database
from ._caller.reader import reader
from ._caller.statements import Kind, LocalStatements
from ._errors import (
    DatabaseError,
    Error,
    IntegrityError,
    OperationalError,
    ProgrammingError,
    SessionExpired,
    WriterUnavailable,
)
from ._wire.address import is_server_url
from ._wire.replies import Result

R = TypeVar("R")

__all__ = [
    "BINARY",
    "DATETIME",
    "LEGACY_TRANSACTION_CONTROL",
    "NUMBER",
    "ROWID",
    "STRING",
    "Binary",
    "Connection",
    "Cursor",
    "DataError",
    "DatabaseError",
    "Date",
    "DateFromTicks",
    "Error",
    "IntegrityError",
    "InterfaceError",
    "InternalError",
    "NotSupportedError",
    "OperationalError",
    "ProgrammingError",
    "Time",
    "TimeFromTicks",
    "Timestamp",
    "TimestampFromTicks",
    "Warning",
    "apilevel",
    "connect",
    "paramstyle",
    "sqlite_version",
    "sqlite_version_info",
    "threadsafety",
]

apilevel = "2.0"
# Threads may share the module, not connections: a connection (its session,
# its reader) is used by one thread at a time, as SQLAlchemy's pool does.
threadsafety = 1
# qmark; named (":name" with a mapping) is accepted too, as by sqlite3.
paramstyle = "qmark"
# The writer runs the same SQLite library as this process (SQLAlchemy's
# pysqlite dialect reads these).
sqlite_version = sqlite3.sqlite_version
sqlite_version_info = sqlite3.sqlite_version_info

LEGACY_TRANSACTION_CONTROL = -1
"""``autocommit`` value: transactions governed by ``isolation_level`` (the default)."""

# -- exceptions: PEP 249's tree, rooted at mpwriter.Error ----------------------
#
# SQL errors reach the caller as their sqlite3 class made to derive from the
# mpwriter class of the same name as well (see mpwriter._errors.portable), so
# ``except mpwriter.dbapi.IntegrityError`` catches ``sqlite3.IntegrityError``
# from the writer, from a session and from the local reader alike.

Warning = _errors.Warning
InterfaceError = _errors.InterfaceError
DataError = _errors.DataError
InternalError = _errors.InternalError
NotSupportedError = _errors.NotSupportedError

# -- types ---------------------------------------------------------------------

Date = datetime.date
Time = datetime.time
Timestamp = datetime.datetime
# bytes, not sqlite3's memoryview: parameters are pickled to the writer, and
# a memoryview does not pickle.
Binary = bytes


def DateFromTicks(ticks: float) -> datetime.date:
    """The local date of ``ticks`` seconds since the epoch."""
    return datetime.date(*time.localtime(ticks)[:3])


def TimeFromTicks(ticks: float) -> datetime.time:
    """The local time of day of ``ticks`` seconds since the epoch."""
    return datetime.time(*time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks: float) -> datetime.datetime:
    """The local date and time of ``ticks`` seconds since the epoch."""
    return datetime.datetime(*time.localtime(ticks)[:6])


class _TypeObject:
    """A PEP 249 type object: equal to each of the SQLite declared types it names.

    SQLite reports no column types in ``description`` (the type code is
    None), so these compare equal to declared type names only.
    """

    def __init__(self, *names: str) -> None:
        self.names = frozenset(names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.upper() in self.names

    def __hash__(self) -> int:
        return hash(self.names)

    def __repr__(self) -> str:
        return f"<mpwriter.dbapi type {sorted(self.names)}>"


STRING = _TypeObject("TEXT", "CHAR", "VARCHAR", "CLOB", "STRING")
BINARY = _TypeObject("BLOB", "BINARY")
NUMBER = _TypeObject("INTEGER", "INT", "REAL", "NUMERIC", "FLOAT", "DOUBLE", "DECIMAL")
DATETIME = _TypeObject("DATE", "DATETIME", "TIMESTAMP", "TIME")
ROWID = _TypeObject("ROWID", "INTEGER")


# -- the writer this process has -------------------------------------------------


class _Session(Protocol):
    """What the connection uses of `mpwriter.Session`."""

    foreign_keys: bool

    @property
    def in_transaction(self) -> bool: ...
    def execute(self, sql: str, params: Any = ()) -> Result: ...
    def executemany(self, sql: str, seq_of_params: Iterable[Any]) -> Result: ...
    def executescript(self, script: str) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


def _connected(database: str) -> Any:
    """A new handle on the writer that serves ``database``: `mpwriter.connect`."""
    import mpwriter  # its public connect(), looked up when first needed

    return mpwriter.connect(database)


def connect(
    database: str | os.PathLike[str],
    timeout: float = 5.0,
    detect_types: int = 0,
    isolation_level: str | None = "DEFERRED",
    check_same_thread: bool = False,
    factory: Any = None,
    cached_statements: int = 128,
    uri: bool = False,
    *,
    autocommit: bool | int = LEGACY_TRANSACTION_CONTROL,
    writer: Any = None,
    idle_limit: float | None = None,
    total_limit: float | None = None,
) -> Connection:
    """Open a DB-API connection to ``database`` through this process's writer.

    The writer handle is ``writer`` if given, else the one attached to this
    process (`mpwriter.attach`, inherited through fork) if it serves
    ``database``, else ``mpwriter.connect(database)`` (one handle per file for
    the process; `WriterUnavailable` when no writer serves it). A ``writer``
    that serves another file is `InterfaceError`. ``timeout`` is the local
    reader's busy timeout (as sqlite3's); ``isolation_level`` and
    ``autocommit`` are sqlite3's; ``idle_limit`` and ``total_limit`` bound
    each transaction's session (`Writer.session`). ``check_same_thread``,
    ``cached_statements`` and ``uri`` (a ``file:`` URI is refused) are
    accepted for sqlite3 compatibility; ``detect_types`` and ``factory`` are
    not supported (`NotSupportedError` unless left at their defaults).
    """
    del check_same_thread, cached_statements, uri  # one thread at a time; a path, not a URI
    path = os.fspath(database)
    if is_server_url(path):
        raise NotSupportedError(
            "mpwriter.dbapi serves SQLite writers only: for PostgreSQL use psycopg "
            "or SQLAlchemy's postgresql dialect directly (see docs/orm.md)"
        )
    if path == ":memory:" or path.startswith("file:"):
        # (uri=True with a plain path names a file, as in sqlite3.)
        raise NotSupportedError("mpwriter.dbapi needs a database file path (not a URI)")
    if detect_types or factory is not None:
        raise NotSupportedError("detect_types and factory are not supported")
    handle = writer if writer is not None else handle_for(path, functools.partial(_connected, path))
    if not same_database(handle.path, path):
        # Reads here and writes there would be two databases.
        raise InterfaceError(f"the writer given serves {handle.path!r}, not {path!r}")
    return Connection(
        handle,
        handle.path,
        timeout=timeout,
        isolation_level=isolation_level,
        autocommit=autocommit,
        idle_limit=idle_limit,
        total_limit=total_limit,
    )


# -- connection ----------------------------------------------------------------


class Connection:
    """A DB-API connection: a local read-only SQLite connection plus a writer session.

    Use it from one thread at a time. ``close()`` rolls back an open
    transaction (as sqlite3 does).
    """

    Warning = Warning
    Error = Error
    InterfaceError = InterfaceError
    DatabaseError = DatabaseError
    DataError = DataError
    OperationalError = OperationalError
    IntegrityError = IntegrityError
    InternalError = InternalError
    ProgrammingError = ProgrammingError
    NotSupportedError = NotSupportedError

    def __init__(
        self,
        writer: Any,
        path: str,
        *,
        timeout: float,
        isolation_level: str | None,
        autocommit: bool | int,
        idle_limit: float | None,
        total_limit: float | None,
    ) -> None:
        self._writer = writer
        self._session_limits = {"idle_limit": idle_limit, "total_limit": total_limit}
        self._session: _Session | None = None
        self._statements = LocalStatements(
            # A file (connect() refused URLs): typed as the sqlite3 connection it is.
            reader(pathlib.Path(path), busy_timeout=timeout, check_same_thread=False)
        )
        self._isolation_level = _checked_isolation_level(isolation_level)
        self._autocommit = _checked_autocommit(autocommit)
        # PEP 249's model (autocommit=False): a transaction is always open.
        self._in_transaction = self._autocommit is False
        self._closed = False
        self.foreign_keys = True
        """False: the transactions this connection opens from now on run in the
        writer with foreign key enforcement off (`Writer.session`), as after a
        sqlite3 connection's ``PRAGMA foreign_keys=OFF``."""

    def __repr__(self) -> str:
        return f"<mpwriter.dbapi.Connection {self._writer.path!r}>"

    # -- PEP 249 --------------------------------------------------------------

    def cursor(self, factory: Callable[[Connection], Cursor] | None = None) -> Cursor:
        """A new cursor on this connection."""
        self._check_open()
        return Cursor(self) if factory is None else factory(self)

    def commit(self) -> None:
        """Commit the open transaction; returns once the group COMMIT is durable.

        Without a transaction, or with ``autocommit=True``, it does nothing.
        """
        self._check_open()
        if self._autocommit is not True:
            self._end(commit=True)

    def rollback(self) -> None:
        """Roll back the open transaction (nothing of it was applied).

        Without a transaction, or with ``autocommit=True``, it does nothing.
        """
        self._check_open()
        if self._autocommit is not True:
            self._end(commit=False)

    def _end(self, *, commit: bool) -> None:
        if not self._in_transaction:
            return
        # Out of the transaction whatever the outcome: the session's
        # transaction is over once its commit or rollback returns or raises
        # (unlike sqlite3, where a failed COMMIT may leave one open).
        self._in_transaction = self._autocommit is False
        if self._session is not None:
            if commit:
                self._session.commit()
            else:
                self._session.rollback()

    def close(self) -> None:
        """Roll back any open transaction and close; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._in_transaction = False
        try:
            if self._session is not None:
                self._session.close()
        finally:
            self._session = None
            self._statements.close()

    # -- sqlite3's extensions ---------------------------------------------------

    def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        """Shortcut: a new cursor's ``execute``."""
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any]) -> Cursor:
        """Shortcut: a new cursor's ``executemany``."""
        return self.cursor().executemany(sql, seq_of_parameters)

    def executescript(self, script: str) -> Cursor:
        """Shortcut: a new cursor's ``executescript``."""
        return self.cursor().executescript(script)

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (its changes not yet committed)."""
        return self._in_transaction

    @property
    def isolation_level(self) -> str | None:
        """sqlite3's: None is autocommit; setting None commits an open transaction."""
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        level = _checked_isolation_level(value)
        if level is None and self._autocommit == LEGACY_TRANSACTION_CONTROL:
            self.commit()
        self._isolation_level = level

    @property
    def autocommit(self) -> bool | int:
        """Python 3.12's ``sqlite3.Connection.autocommit`` (LEGACY_TRANSACTION_CONTROL,
        True or False); changing it commits an open transaction."""
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool | int) -> None:
        value = _checked_autocommit(value)
        if self._in_transaction and self._session is not None:
            self._session.commit()
        self._autocommit = value
        self._in_transaction = value is False

    if sys.version_info >= (3, 11):  # sqlite3.Connection.getlimit is 3.11's

        def getlimit(self, category: int, /) -> int:
            """SQLite's run-time limit ``category`` (``sqlite3.SQLITE_LIMIT_*``).

            Read on the local reader: the writer runs the same SQLite library with
            its default limits, so its limit is the same (Django 6 sizes its bulk
            inserts by the number of variables allowed).
            """
            self._check_open()
            return int(self._statements.conn.getlimit(category))

    def create_function(
        self, name: str, narg: int, func: Any, *, deterministic: bool = False
    ) -> None:
        """Register a function on the local reader only (not in the writer)."""
        self._check_open()
        self._statements.conn.create_function(name, narg, func, deterministic=deterministic)

    def create_aggregate(self, name: str, n_arg: int, aggregate_class: Any) -> None:
        """Register an aggregate on the local reader only (not in the writer)."""
        self._check_open()
        self._statements.conn.create_aggregate(name, n_arg, aggregate_class)

    def create_collation(self, name: str, callable: Any) -> None:
        """Register a collation on the local reader only (not in the writer)."""
        self._check_open()
        self._statements.conn.create_collation(name, callable)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        """As sqlite3: commit on success, roll back on an exception; do not close."""
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    # -- routing --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ProgrammingError("Cannot operate on a closed database.")

    def _session_now(self) -> _Session:
        if self._session is None:
            self._session = self._writer.session(**self._session_limits)
        if not self._session.in_transaction:
            self._session.foreign_keys = self.foreign_keys
        return self._session

    def _in_open_transaction(self, call: Callable[..., R], *args: Any) -> R:
        """``call(*args)`` on the session; a transaction the writer lost ends here too.

        After `SessionExpired` (rolled back past its limits) or
        `WriterUnavailable` (the writer closed or died) the writer holds no
        transaction of ours, so none is open: ``in_transaction`` turns False,
        as sqlite3's does when SQLite rolls back on its own, and the next
        statement begins anew.
        """
        try:
            return call(*args)
        except (SessionExpired, WriterUnavailable):
            self._in_transaction = self._autocommit is False
            raise

    def _legacy_begins(self) -> bool:
        return self._autocommit == LEGACY_TRANSACTION_CONTROL and self._isolation_level is not None

    def _run(self, sql: str, params: Any) -> Result | sqlite3.Cursor:
        """Run one statement where it belongs; return the reader's cursor or the writer's Result.

        Called by a cursor, which checked that this connection is open (as for
        `_run_many` and `_run_script`).
        """
        if self._in_transaction:
            kind, _ = self._statements.classify(sql, params, run_reads=False)
            return self._in_session(kind, sql, params)
        kind, ran = self._statements.classify(sql, params, run_reads=True)
        if ran is not None:
            return ran
        if kind is Kind.READ:
            return self._statements.read(sql, params)
        if kind is Kind.DML and self._legacy_begins():
            self._in_transaction = True
            return self._in_session(kind, sql, params)
        if kind is Kind.DML or kind is Kind.WRITE:
            result: Result = self._writer.execute(sql, params)
            return result
        if kind is Kind.BEGIN:
            self._in_transaction = True
            return _NO_ROWS
        if kind is Kind.SAVEPOINT:
            # SQLite opens a transaction at a SAVEPOINT outside one; the
            # session does the same (RELEASE ends the savepoint, commit() the
            # transaction).
            self._in_transaction = True
            return self._in_session(kind, sql, params)
        raise OperationalError(f"cannot {kind.value} - no transaction is active")

    def _in_session(self, kind: Kind, sql: str, params: Any) -> Result:
        if kind is Kind.BEGIN:
            raise OperationalError("cannot start a transaction within a transaction")
        if kind is Kind.COMMIT or kind is Kind.ROLLBACK:
            # As SQL, they end the transaction in every mode (autocommit=True
            # included, where the methods do nothing).
            self._end(commit=kind is Kind.COMMIT)
            return _NO_ROWS
        result = self._in_open_transaction(self._session_now().execute, sql, params)
        if result.columns is None and not result.rows:
            columns = self._statements.columns_of(sql, params)
            if columns is not None:
                result = result._replace(columns=columns)
        return result

    def _run_many(self, sql: str, seq_of_params: Iterable[Any]) -> Result:
        params_list = list(seq_of_params)
        if not params_list:
            return _NO_ROWS
        if not self._in_transaction:
            kind, cursor = self._statements.classify(sql, params_list[0], run_reads=True)
            if cursor is not None or kind is Kind.READ:
                raise ProgrammingError("executemany() can only execute DML statements.")
            if kind is not Kind.DML and kind is not Kind.WRITE:
                raise ProgrammingError("executemany() can only execute DML statements.")
            if not (kind is Kind.DML and self._legacy_begins()):
                result: Result = self._writer.executemany(sql, params_list)
                return result
            self._in_transaction = True
        return self._in_open_transaction(self._session_now().executemany, sql, params_list)

    def _run_script(self, script: str) -> None:
        if self._autocommit == LEGACY_TRANSACTION_CONTROL and self._in_transaction:
            self.commit()  # as sqlite3: a pending transaction is committed first
        if self._in_transaction:
            self._in_open_transaction(self._session_now().executescript, script)
        else:
            self._writer.executescript(script)


_NO_ROWS = Result(-1, None, [])


def _checked_isolation_level(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.upper() not in (
        "",
        "DEFERRED",
        "IMMEDIATE",
        "EXCLUSIVE",
    ):
        raise ValueError(
            "isolation_level string must be '', 'DEFERRED', 'IMMEDIATE', or 'EXCLUSIVE'"
        )
    return value


def _checked_autocommit(value: bool | int) -> bool | int:
    if value is True or value is False or value == LEGACY_TRANSACTION_CONTROL:
        return value
    raise ValueError("autocommit must be True, False, or sqlite3.LEGACY_TRANSACTION_CONTROL")
