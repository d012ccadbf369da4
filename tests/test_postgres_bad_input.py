"""Bad input on PostgreSQL: each case ends in a clear error for that caller,
and the writer serves on (the SQLite suite is tests/test_bad_input.py)."""

from __future__ import annotations

import os
from typing import Any

import pytest

import mpwriter
from conftest import pg_count

psycopg = pytest.importorskip("psycopg", reason="PostgreSQL tests: psycopg is not installed")

CHECKED_SCHEMA = """
CREATE TABLE parent (id INTEGER PRIMARY KEY);
CREATE TABLE checked (
    id SERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    age INTEGER CHECK (age >= 0),
    parent INTEGER REFERENCES parent (id)
);
INSERT INTO checked (name) VALUES ('dup');
"""


@pytest.mark.parametrize(
    ("sql", "params", "driver_error", "mpwriter_error"),
    [
        ("INSERT INTO checked (name) VALUES (NULL)", (), "NotNullViolation", "IntegrityError"),
        (
            "INSERT INTO checked (name, age) VALUES ('a', -1)",
            (),
            "CheckViolation",
            "IntegrityError",
        ),
        ("INSERT INTO checked (name) VALUES ('dup')", (), "UniqueViolation", "IntegrityError"),
        (
            "INSERT INTO checked (name, parent) VALUES ('orphan', 7)",
            (),
            "ForeignKeyViolation",
            "IntegrityError",
        ),
        ("INSERT INTO checked (name) VALUES (?, ?)", ("a", "b"), "SyntaxError", "ProgrammingError"),
        (
            "INSERT INTO checked (age) VALUES (?)",
            ("not a number",),
            "InvalidTextRepresentation",
            "DataError",
        ),
        ("INSERT INTO", (), "SyntaxError", "ProgrammingError"),
        ("INSERT INTO nowhere VALUES (1)", (), "UndefinedTable", "ProgrammingError"),
    ],
)
def test_bad_statements_fail_alone(
    pg_writer: mpwriter.Writer,
    sql: str,
    params: tuple[Any, ...],
    driver_error: str,
    mpwriter_error: str,
) -> None:
    pg_writer.executescript(CHECKED_SCHEMA)
    with pytest.raises(getattr(psycopg.errors, driver_error)) as caught:
        pg_writer.execute(sql, params)
    expected = getattr(mpwriter, mpwriter_error, mpwriter.DatabaseError)
    assert isinstance(caught.value, expected)
    assert isinstance(caught.value, mpwriter.DatabaseError)
    assert pg_writer.execute("INSERT INTO checked (name) VALUES ('fine')").rowcount == 1


def test_wrong_parameter_counts_and_types_fail_alone(pg_writer: mpwriter.Writer) -> None:
    with pytest.raises(mpwriter.Error):
        pg_writer.execute("INSERT INTO items (client, seq) VALUES (?, ?)", (1,))
    with pytest.raises(mpwriter.Error):
        pg_writer.execute("INSERT INTO items (client) VALUES (?)", (object(),))
    assert pg_writer.execute("INSERT INTO items (client, seq) VALUES (?, ?)", (1, 1)).rowcount == 1


def test_a_10_mb_bytea_round_trips(pg_writer: mpwriter.Writer, pg_fresh: str) -> None:
    blob = os.urandom(10 * 1024 * 1024)
    pg_writer.execute("CREATE TABLE blobs (data BYTEA)")
    pg_writer.execute("INSERT INTO blobs VALUES (?)", (blob,), timeout=60)
    with mpwriter.reader(pg_fresh) as conn:
        assert bytes(conn.execute("SELECT data FROM blobs").fetchone()[0]) == blob


def test_a_large_reply_does_not_stall_the_writer(pg_writer: mpwriter.Writer) -> None:
    rows = pg_writer.execute(
        "INSERT INTO items (client, seq, payload)"
        " SELECT 2, n, repeat(md5(n::text), 16) FROM generate_series(1, 5000) AS n"
        " RETURNING payload"
    ).rows
    assert len(rows) == 5000  # about 2.5 MB of reply, far more than a pipe holds
    assert pg_writer.execute("INSERT INTO items (client, seq) VALUES (3, 1)").rowcount == 1


def test_sql_of_the_wrong_type_is_a_clear_error(pg_writer: mpwriter.Writer, pg_fresh: str) -> None:
    with pytest.raises(TypeError, match="must be a str, not bytes"):
        pg_writer.execute(b"INSERT INTO items (client) VALUES (1)")  # type: ignore[arg-type]
    assert pg_writer.execute("INSERT INTO items (client, seq) VALUES (4, 1)").rowcount == 1
    assert pg_count(pg_fresh) == 1
