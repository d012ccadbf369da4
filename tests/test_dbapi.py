"""DB-API shapes: Result.description and rows as dicts."""

from __future__ import annotations

import contextlib
import sqlite3

import mpwriter


def test_description_names_returning_columns_as_sqlite3_does(writer: mpwriter.Writer) -> None:
    sql = "INSERT INTO items(seq, payload) VALUES (?, ?) RETURNING id, seq AS position, payload"
    result = writer.execute(sql, (7, "x"))
    with contextlib.closing(sqlite3.connect(":memory:")) as reference:
        reference.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, seq INTEGER, payload TEXT)")
        assert result.description == reference.execute(sql, (7, "x")).description
    assert result.description == (
        ("id", None, None, None, None, None, None),
        ("position", None, None, None, None, None, None),
        ("payload", None, None, None, None, None, None),
    )
    assert result.columns == ("id", "position", "payload")
    assert result.dicts() == [{"id": result.rows[0][0], "position": 7, "payload": "x"}]


def test_description_is_none_only_without_a_result_set(writer: mpwriter.Writer) -> None:
    result = writer.execute("INSERT INTO items(seq) VALUES (1)")
    assert result.description is None
    assert result.columns is None
    assert result.dicts() == []
    # A statement with a result set that produced no rows: no rows, but its
    # columns named, as sqlite3's cursor.description does.
    sql = "DELETE FROM items WHERE seq = 42 RETURNING id"
    empty = writer.execute(sql)
    assert empty.rows == []
    with contextlib.closing(sqlite3.connect(":memory:")) as reference:
        reference.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, seq INTEGER, payload TEXT)")
        assert empty.description == reference.execute(sql).description
    assert empty.columns == ("id",)
    assert writer.executemany("INSERT INTO items(seq) VALUES (?)", [(2,), (3,)]).description is None


def test_description_comes_with_every_kind_of_result(writer: mpwriter.Writer) -> None:
    with writer.transaction() as tx:
        tx.execute("INSERT INTO items(seq) VALUES (5) RETURNING seq AS n")
        tx.execute("INSERT INTO items(seq) VALUES (6)")
    assert tx.results is not None
    assert [r.dicts() for r in tx.results] == [[{"n": 5}], []]
    future = writer.submit("UPDATE items SET payload = 'y' WHERE seq = 5 RETURNING seq, payload")
    assert future.result(timeout=10).dicts() == [{"seq": 5, "payload": "y"}]


def test_a_three_field_result_still_builds() -> None:
    # Replies without rows carry three fields; Result(*value) must take them.
    result = mpwriter.Result(*(1, 2, []))
    assert result == mpwriter.Result(1, 2, [], None)
    assert result.description is None
