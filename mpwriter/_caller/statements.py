"""What a statement does, asked of SQLite, and the local reads of `mpwriter.dbapi`.

A DB-API connection must route each statement: a read outside a transaction
runs here, on a read-only connection; a write, or anything inside a
transaction, goes to the writer; BEGIN, COMMIT and ROLLBACK are the
connection's own to act on. The text is not parsed to decide: the read-only
connection compiles the statement under an authorizer callback
(`sqlite3.Connection.set_authorizer`) that lets reads through and refuses,
noting it, the first action that would write or control a transaction
(SQLITE_INSERT on a table, SQLITE_TRANSACTION "COMMIT", SQLITE_SAVEPOINT ...).
A refused statement was compiled, never run (no I/O, no lock). A read
runs at once, in the same call. Each text's kind is cached (SQLite does not
ask the authorizer again for a statement in its own statement cache).
"""

from __future__ import annotations

import enum
import sqlite3
from typing import Any

from .._errors import portable


class Kind(enum.Enum):
    """What a statement does, as far as routing it needs."""

    READ = "read"  # runs on the local reader
    DML = "dml"  # INSERT/UPDATE/DELETE/REPLACE on a table: opens a legacy transaction
    WRITE = "write"  # any other write: DDL, a pragma that writes, VACUUM, ANALYZE
    BEGIN = "begin"
    COMMIT = "commit"  # COMMIT or END
    ROLLBACK = "rollback"  # plain ROLLBACK (not ROLLBACK TO)
    SAVEPOINT = "savepoint"  # SAVEPOINT, RELEASE, ROLLBACK TO
    OTHER = "other"  # inside a transaction: anything that is not BEGIN/COMMIT/ROLLBACK


_TRANSACTION_CONTROL = (Kind.BEGIN, Kind.COMMIT, Kind.ROLLBACK)
_READ_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_SELECT,
        sqlite3.SQLITE_FUNCTION,
        sqlite3.SQLITE_PRAGMA,  # one that writes the file fails as SQLITE_READONLY
        getattr(sqlite3, "SQLITE_RECURSIVE", 33),
    }
)
_DML_ACTIONS = frozenset({sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE})
# DDL shows first as a write to the schema table (CREATE: SQLITE_INSERT on sqlite_master).
_SCHEMA_TABLES = frozenset(
    {"sqlite_master", "sqlite_temp_master", "sqlite_schema", "sqlite_temp_schema"}
)
_TRANSACTION_KINDS = {"BEGIN": Kind.BEGIN, "COMMIT": Kind.COMMIT, "ROLLBACK": Kind.ROLLBACK}
_SQLITE_READONLY = 8
_CACHED = 512  # texts per connection


def _kind_of(action: int, arg1: str | None) -> Kind:
    if action == sqlite3.SQLITE_TRANSACTION:
        return _TRANSACTION_KINDS[arg1 or ""]
    if action == sqlite3.SQLITE_SAVEPOINT:
        return Kind.SAVEPOINT
    if action in _DML_ACTIONS and arg1 not in _SCHEMA_TABLES:
        return Kind.DML
    return Kind.WRITE


class _Authorizer:
    """Notes the first action that is not a read, and refuses it.

    With ``run_reads`` false every statement is refused at its first action,
    so that nothing runs and only BEGIN, COMMIT and ROLLBACK are told apart.
    """

    __slots__ = ("kind", "run_reads")

    def __init__(self) -> None:
        self.kind: Kind | None = None
        self.run_reads = True

    def arm(self, run_reads: bool) -> None:
        self.kind = None
        self.run_reads = run_reads

    def __call__(
        self, action: int, arg1: str | None, _arg2: str | None, _db: str | None, _src: str | None
    ) -> int:
        if self.kind is not None:
            return sqlite3.SQLITE_DENY
        if self.run_reads and action in _READ_ACTIONS:
            return sqlite3.SQLITE_OK
        kind = _kind_of(action, arg1)
        self.kind = kind if self.run_reads or kind in _TRANSACTION_CONTROL else Kind.OTHER
        return sqlite3.SQLITE_DENY


# Any read of the schema table brings this connection's schema up to date.
_READ_SCHEMA = "SELECT 1 FROM sqlite_master LIMIT 0"


class LocalStatements:
    """A read-only SQLite connection that classifies statements and runs the reads.

    Used by one thread at a time (its DB-API connection's).
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        # Single statements in SQLite's own autocommit: each read sees the
        # latest commit.
        conn.isolation_level = None
        self._authorizer = _Authorizer()
        conn.set_authorizer(self._authorizer)
        self._kinds: dict[str, Kind] = {}
        self._not_control: dict[str, Kind] = {}  # OTHER: texts seen inside a transaction
        self._columns: dict[str, tuple[str, ...] | None] = {}

    def close(self) -> None:
        self.conn.close()

    def classify(
        self, sql: str, params: Any, *, run_reads: bool
    ) -> tuple[Kind, sqlite3.Cursor | None]:
        """The statement's kind and, for a read that ran here, its cursor.

        With ``run_reads`` (outside a transaction) a read runs at once and an
        SQL error of it is raised (as `local_error`); otherwise (inside a
        transaction) nothing runs here, the kind is BEGIN, COMMIT, ROLLBACK or
        OTHER, and a statement that does not compile here is left for the
        writer to run or report.
        """
        kind = self._kinds.get(sql)
        if kind is not None:
            if run_reads or kind in _TRANSACTION_CONTROL:
                return kind, None
            return Kind.OTHER, None
        if not run_reads and sql in self._not_control:
            return Kind.OTHER, None
        authorizer = self._authorizer
        authorizer.arm(run_reads)
        try:
            try:
                cursor = self.conn.execute(sql, params)
            except sqlite3.Error:
                if authorizer.kind is not None or not run_reads:
                    raise
                # SQLite compiles against the schema this connection last
                # read: a table another connection dropped or renamed since
                # fails "already exists" here. Read the schema, then try once more.
                self.conn.execute(_READ_SCHEMA).fetchall()
                authorizer.arm(run_reads)
                cursor = self.conn.execute(sql, params)
        except sqlite3.Error as exc:
            kind = authorizer.kind
            if kind is None:
                if not run_reads and isinstance(exc, sqlite3.OperationalError):
                    # It did not compile here (a table this transaction
                    # made, say): the session runs it, or reports its error.
                    return Kind.OTHER, None
                if not _is_readonly(exc):
                    raise local_error(exc) from None
                kind = Kind.WRITE  # e.g. a pragma that writes the file
            _remember(self._kinds if kind is not Kind.OTHER else self._not_control, sql, kind)
            return kind, None
        if not run_reads:
            # No action to refuse (a statement that reads no table): it ran
            # here, read-only, and runs again in the session.
            cursor.close()
            return Kind.OTHER, None
        _remember(self._kinds, sql, Kind.READ)
        return Kind.READ, cursor

    def read(self, sql: str, params: Any) -> sqlite3.Cursor:
        """Run a statement already known to be a read."""
        # SQLite may compile it again (evicted from its statement cache, or
        # the schema changed): the authorizer must then let it read.
        self._authorizer.arm(run_reads=True)
        try:
            return self.conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise local_error(exc) from None

    def columns_of(self, sql: str, params: Any) -> tuple[str, ...] | None:
        """A read's column names, for a writer reply that had no rows to carry them.

        The writer names columns only alongside rows; DB-API callers need a
        description for an empty result too (SQLAlchemy tells "returns rows"
        by it). A read runs again here for its description; a write (refused
        here) or a read of what only the open transaction has made (a new
        table) gets None.
        """
        if sql in self._columns:
            return self._columns[sql]
        if self._kinds.get(sql, Kind.READ) is not Kind.READ:
            return None
        self._authorizer.arm(run_reads=True)
        try:
            cursor = self.conn.execute(sql, params)
        except sqlite3.Error:
            return None  # see the docstring: no description to be had here
        description = cursor.description
        cursor.close()
        columns = None if description is None else tuple(d[0] for d in description)
        _remember(self._columns, sql, columns)
        return columns


def _remember(cache: dict[str, Any], sql: str, value: Any) -> None:
    if len(cache) >= _CACHED:
        del cache[next(iter(cache))]
    cache[sql] = value


def _is_readonly(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused ``exc``'s statement as a write on a read-only database."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        # Python 3.10's sqlite3 errors carry no code: SQLite's own text for
        # SQLITE_READONLY is all there is.
        return str(exc) == "attempt to write a readonly database"
    return bool(code & 0xFF == _SQLITE_READONLY)


def local_error(exc: sqlite3.Error) -> BaseException:
    """A local reader's error as the writer would raise it: its sqlite3 class made portable."""
    return portable(exc).with_traceback(exc.__traceback__)
