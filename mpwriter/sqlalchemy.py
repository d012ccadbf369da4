"""SQLAlchemy's ``sqlite+mpwriter://`` dialect: SQLite through the writer.

    engine = sqlalchemy.create_engine("sqlite+mpwriter:///app.db")

Registered by the ``sqlalchemy.dialects`` entry point (``pip install
mpwriter[sqlalchemy]``); the process must have a writer handle for the file
(see `mpwriter.dbapi.connect`), or pass one: ``connect_args={"writer": w}``.

It is SQLAlchemy's pysqlite dialect over `mpwriter.dbapi`, with one change:
a transaction begins with an explicit BEGIN (`do_begin`), so that every
statement of an ORM ``Session.begin()`` block, reads included, runs in one
writer session and sees a state no other writer changes until it commits.
(The pysqlite dialect lets the sqlite3 module begin at the first write, after
the reads: the lost updates this package exists to prevent.) An engine or
connection with ``isolation_level="AUTOCOMMIT"`` begins nothing: its reads
run locally and each write is its own group-committed request.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

from . import dbapi as _dbapi
from ._errors import WriterUnavailable


class MPWriterDialect(SQLiteDialect_pysqlite):
    """``sqlite+mpwriter``: the pysqlite dialect with `mpwriter.dbapi` as its driver."""

    driver = "mpwriter"
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> ModuleType:
        return _dbapi

    def do_begin(self, dbapi_connection: Any) -> None:
        """Open the DB-API connection's transaction now, unless it is in autocommit."""
        if dbapi_connection.isolation_level is None or dbapi_connection.autocommit is True:
            return
        if not dbapi_connection.in_transaction:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("BEGIN")
            finally:
                cursor.close()

    def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool:
        """A closed or dead writer took the connection's transaction with it: the
        pool drops the connection (``connection_invalidated``) and makes a new one."""
        return isinstance(e, WriterUnavailable) or super().is_disconnect(e, connection, cursor)


dialect = MPWriterDialect
