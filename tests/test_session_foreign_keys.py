"""`Writer.session(foreign_keys=False)`: a transaction without foreign key enforcement.

What a schema change that rebuilds a referenced table needs (Django's
migrations do), without turning enforcement off for anyone else; and a
session's own COMMIT that fails (a deferred violation) raises SQLite's error.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

import mpwriter

SCHEMA = """
CREATE TABLE IF NOT EXISTS parent(id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE IF NOT EXISTS child(id INTEGER PRIMARY KEY,
    parent_id INTEGER NOT NULL REFERENCES parent(id));
CREATE TABLE IF NOT EXISTS late(id INTEGER PRIMARY KEY,
    parent_id INTEGER NOT NULL REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);
INSERT OR IGNORE INTO parent VALUES (1, 'p');
INSERT OR IGNORE INTO child VALUES (1, 1);
"""

REBUILD = [
    "CREATE TABLE new__parent(id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
    "INSERT INTO new__parent SELECT id, name FROM parent",
    "DROP TABLE parent",
    "ALTER TABLE new__parent RENAME TO parent",
]


@pytest.fixture
def writer(db_path: Path) -> Iterator[mpwriter.Writer]:
    handle = mpwriter.start(db_path, init=SCHEMA, timeout=10.0, context="fork")
    try:
        yield handle
    finally:
        handle.close(timeout=10.0)


def committed(db_path: Path, sql: str) -> list[tuple[object, ...]]:
    with mpwriter.reader(db_path) as conn:
        return list(conn.execute(sql).fetchall())


def test_a_referenced_table_is_rebuilt_only_with_enforcement_off(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    enforced = writer.session()
    for statement in REBUILD[:2]:
        enforced.execute(statement)
    with pytest.raises(sqlite3.IntegrityError):
        enforced.execute(REBUILD[2])  # DROP TABLE parent: child's row would dangle
    enforced.rollback()
    with writer.session(foreign_keys=False) as session:
        for statement in REBUILD:
            session.execute(statement)
        assert session.execute("PRAGMA foreign_key_check").rows == []
    assert (
        "NOT NULL" in committed(db_path, "SELECT sql FROM sqlite_master WHERE name='parent'")[0][0]
    )
    assert committed(db_path, "SELECT parent_id FROM child") == [(1,)]
    # Enforcement is back on for plain requests and for the next session.
    with pytest.raises(sqlite3.IntegrityError):
        writer.execute("INSERT INTO child VALUES (2, 99)")
    with writer.session() as session, pytest.raises(sqlite3.IntegrityError):
        session.execute("INSERT INTO child VALUES (3, 99)")


def test_a_request_held_behind_it_is_still_checked(writer: mpwriter.Writer, db_path: Path) -> None:
    before = writer.stats()
    session = writer.session(foreign_keys=False)
    session.execute("INSERT INTO child VALUES (5, 77)")  # dangling: allowed in here
    held = writer.submit("INSERT INTO child VALUES (6, 88)")  # held until the session ends
    session.commit()
    with pytest.raises(sqlite3.IntegrityError):
        held.result(timeout=10)
    after = writer.stats()
    assert after["session_waits"] - before["session_waits"] == 1
    assert committed(db_path, "SELECT id FROM child ORDER BY id") == [(1,), (5,)]


def test_a_deferred_violation_fails_the_sessions_commit_with_integrity_error(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    session = writer.session()
    session.execute("INSERT INTO late VALUES (1, 99)")  # checked at COMMIT
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        session.commit()
    assert committed(db_path, "SELECT count(*) FROM late") == [(0,)]
    session.execute("INSERT INTO late VALUES (2, 1)")  # the session goes on
    session.commit()
    assert committed(db_path, "SELECT id FROM late") == [(2,)]
