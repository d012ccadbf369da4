"""The backend: Django's SQLite backend with `mpwriter.dbapi` as its driver.

Changed from ``django.db.backends.sqlite3`` and why:

* the driver is `mpwriter.dbapi`, on the writer `writer_for` gives; the
  SQL functions Django registers on each connection are registered on the
  local reader here and in the writer by its ``init`` (`writer_init`);
* parameters are adapted here (Django's adapters for Decimal, date and
  datetime), since statements are pickled to the writer;
* foreign key enforcement is switched per transaction: a schema editor's
  transaction (a table rebuild) runs in the writer with enforcement off and
  ``PRAGMA foreign_key_check`` before its commit, as on the stock backend,
  without turning it off for anyone else;
* ``detect_types`` is not available (rows come as SQLite stores them: Django's
  own converters turn model fields into Python values; ``[datetime]``
  column-name hints in raw SQL are not honoured); in-memory databases and
  URIs are refused (the writer is another process).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from itertools import tee
from typing import Any

from django.db.backends.sqlite3 import base as sqlite3_base  # type: ignore[import-untyped]
from django.db.backends.sqlite3._functions import (  # type: ignore[import-untyped]
    register as register_functions,
)
from django.utils.asyncio import async_unsafe  # type: ignore[import-untyped]

from .. import dbapi
from .creation import DatabaseCreation
from .writers import writer_for

# Options of settings.DATABASES[...]["OPTIONS"] that are ours, not dbapi.connect's.
_WRITER_OPTIONS = ("synchronous",)
_adapt = sqlite3.adapt
_protocol = sqlite3.PrepareProtocol


class DatabaseWrapper(sqlite3_base.DatabaseWrapper):  # type: ignore[misc]
    """Django's SQLite ``DatabaseWrapper`` over `mpwriter.dbapi`."""

    Database = dbapi
    creation_class = DatabaseCreation

    def get_connection_params(self) -> dict[str, Any]:
        """The stock parameters less what `mpwriter.dbapi.connect` does not take.

        ``OPTIONS`` may also hold ``idle_limit`` and ``total_limit`` (each
        transaction's bounds in the writer, `Writer.session`) and
        ``synchronous`` (used if this process starts the writer).
        """
        kwargs: dict[str, Any] = super().get_connection_params()
        name = kwargs["database"]
        if self.creation.is_in_memory_db(name) or str(name).startswith("file:"):
            from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]

            raise ImproperlyConfigured(
                "mpwriter.django needs a database file path in NAME (and in TEST's NAME):"
                " the writer is another process, an in-memory database cannot be shared"
            )
        kwargs.pop("detect_types", None)
        kwargs.pop("uri", None)
        return kwargs

    @async_unsafe  # type: ignore[untyped-decorator]
    def get_new_connection(self, conn_params: dict[str, Any]) -> dbapi.Connection:
        """A `mpwriter.dbapi` connection on the writer this process uses for NAME."""
        params = dict(conn_params)
        start_options = {key: params.pop(key) for key in _WRITER_OPTIONS if key in params}
        writer = writer_for(str(params["database"]), **start_options)
        conn = dbapi.connect(**params, writer=writer)
        register_functions(conn)  # on the local reader; the writer has them from its init
        # On the local reader, where ``PRAGMA foreign_keys`` outside a
        # transaction is answered; the writer enforces them from its start.
        conn.execute("PRAGMA foreign_keys = ON")
        for init_command in self.init_commands:
            if init_command := init_command.strip():
                conn.execute(init_command)
        return conn

    def create_cursor(self, name: str | None = None) -> CursorWrapper:
        cursor: CursorWrapper = self.connection.cursor(factory=CursorWrapper)
        return cursor

    def disable_constraint_checking(self) -> bool:
        """Foreign key enforcement off for the transactions this connection opens next.

        As on SQLite, it cannot change inside a transaction: returns whether
        enforcement is off for the open one.
        """
        self.ensure_connection()
        conn: dbapi.Connection = self.connection
        if conn.in_transaction:
            return not conn.foreign_keys
        conn.foreign_keys = False
        conn.execute("PRAGMA foreign_keys = OFF")  # what the reader answers, as SQLite would
        return True

    def enable_constraint_checking(self) -> None:
        """Foreign key enforcement back on for the transactions opened from now on."""
        self.ensure_connection()
        conn: dbapi.Connection = self.connection
        if not conn.in_transaction:
            conn.foreign_keys = True
            conn.execute("PRAGMA foreign_keys = ON")


class CursorWrapper(dbapi.Cursor):
    """Django's "format"/"pyformat" placeholders to sqlite3's, as the stock
    ``SQLiteCursorWrapper`` does; parameters adapted here, before they are
    pickled to the writer, with the adapters registered on sqlite3 (Django's)."""

    def execute(self, query: str, params: Any = None) -> CursorWrapper:
        if params is None:
            super().execute(query)
            return self
        param_names = list(params) if isinstance(params, Mapping) else None
        query = self.convert_query(query, param_names=param_names)
        super().execute(query, _adapted(params))
        return self

    def executemany(self, query: str, param_list: Iterable[Any]) -> CursorWrapper:
        peekable, params_iter = tee(iter(param_list))
        first = next(peekable, None)
        param_names = list(first) if first and isinstance(first, Mapping) else None
        query = self.convert_query(query, param_names=param_names)
        super().executemany(query, _all_adapted(params_iter))
        return self

    def convert_query(self, query: str, *, param_names: list[str] | None = None) -> str:
        if param_names is None:
            return sqlite3_base.FORMAT_QMARK_REGEX.sub("?", query).replace("%%", "%")  # type: ignore[no-any-return]
        return query % {name: f":{name}" for name in param_names}


def _adapted(params: Any) -> Any:
    if isinstance(params, Mapping):
        return {key: _value(value) for key, value in params.items()}
    return tuple([_value(value) for value in params])


_PLAIN = frozenset({int, str, float, bytes, type(None), bool})


def _value(value: Any) -> Any:
    """``value`` as SQLite binds it, in a type that pickles: sqlite3's adapters
    applied, subclasses of str, int, float and bytes (Django's TextChoices and
    IntegerChoices members, possibly of classes local to a function) made plain."""
    if type(value) in _PLAIN:
        return value
    value = _adapt(value, _protocol, value)
    if isinstance(value, str):
        return str.__str__(value)  # the text, not the subclass's __str__
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, bytes):
        return bytes(value)
    return value


def _all_adapted(param_list: Iterable[Any]) -> Iterator[Any]:
    for params in param_list:
        yield _adapted(params)
