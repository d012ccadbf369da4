"""One except clause for both engines: mpwriter.IntegrityError and friends.

The SQLite half runs everywhere; the psycopg half needs only psycopg (no server).
"""

from __future__ import annotations

import pickle
import sqlite3

import pytest

import mpwriter
from mpwriter._errors import portable


def test_sqlite_integrity_error_from_the_writer_is_caught_both_ways(
    writer: mpwriter.Writer,
) -> None:
    writer.execute("INSERT INTO items(id, client) VALUES (1, 1)")
    with pytest.raises(mpwriter.IntegrityError) as caught:
        writer.execute("INSERT INTO items(id, client) VALUES (1, 2)")
    assert isinstance(caught.value, sqlite3.IntegrityError)
    assert isinstance(caught.value, mpwriter.DatabaseError)
    assert isinstance(caught.value, mpwriter.Error)
    assert "UNIQUE constraint failed" in str(caught.value)
    assert type(caught.value).__name__ == "IntegrityError"
    with pytest.raises(sqlite3.IntegrityError):
        writer.execute("INSERT INTO items(id, client) VALUES (1, 3)")


def test_sqlite_operational_error_is_an_mpwriter_operational_error(
    writer: mpwriter.Writer,
) -> None:
    with pytest.raises(mpwriter.OperationalError) as caught:
        writer.execute("INSERT INTO no_such_table VALUES (1)")
    assert isinstance(caught.value, sqlite3.OperationalError)
    assert not isinstance(caught.value, mpwriter.IntegrityError)


def test_portable_sqlite_error_keeps_attributes_and_pickles() -> None:
    original = sqlite3.IntegrityError("UNIQUE constraint failed: t.x")
    original.sqlite_errorcode = 2067  # type: ignore[attr-defined]
    copy = portable(original)
    again = pickle.loads(pickle.dumps(copy))
    for exc in (copy, again):
        assert isinstance(exc, sqlite3.IntegrityError)
        assert isinstance(exc, mpwriter.IntegrityError)
        assert exc.args == original.args
        assert exc.sqlite_errorcode == 2067  # type: ignore[attr-defined]
    assert type(again) is type(copy)


def test_sqlite_data_error_maps_to_database_error() -> None:
    exc = portable(sqlite3.DataError("too big"))
    assert isinstance(exc, mpwriter.DatabaseError)
    assert not isinstance(exc, mpwriter.OperationalError)


def test_non_driver_errors_are_untouched() -> None:
    error = ValueError("x")
    assert portable(error) is error
    ours = mpwriter.Timeout("t")
    assert portable(ours) is ours


def test_psycopg_errors_map_by_their_dbapi_class() -> None:
    errors = pytest.importorskip("psycopg.errors", reason="psycopg is not installed")
    unique = portable(errors.UniqueViolation("duplicate key"))
    assert isinstance(unique, errors.UniqueViolation)
    assert isinstance(unique, mpwriter.IntegrityError)
    assert unique.sqlstate == "23505"
    again = pickle.loads(pickle.dumps(unique))
    assert isinstance(again, errors.UniqueViolation)
    assert isinstance(again, mpwriter.IntegrityError)
    assert again.sqlstate == "23505"
    assert str(again) == "duplicate key"
    serialization = portable(errors.SerializationFailure("conflict"))
    assert isinstance(serialization, mpwriter.OperationalError)
    assert isinstance(portable(errors.UndefinedTable("no t")), mpwriter.ProgrammingError)


def test_new_error_classes_pickle() -> None:
    for cls in (mpwriter.ServerUnavailable, mpwriter.OutcomeUnknown, mpwriter.IntegrityError):
        exc = pickle.loads(pickle.dumps(cls("message")))
        assert type(exc) is cls
        assert str(exc) == "message"
    assert issubclass(mpwriter.OutcomeUnknown, mpwriter.ServerUnavailable)
