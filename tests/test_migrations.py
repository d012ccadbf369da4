"""start(migrations=[...]): applied once each, in order, atomically, tracked in the database.

On SQLite and PostgreSQL: a migration that is not idempotent (ALTER TABLE ...
ADD COLUMN fails if run twice) proves it ran once, across a later start and
a restart of the writer after a SIGKILL; a failing migration stops the start,
leaves nothing of itself, and keeps the ones before it.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import mpwriter
from conftest import sigkill_and_wait

V1 = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT NOT NULL)"
V2 = "ALTER TABLE notes ADD COLUMN created TEXT; CREATE INDEX notes_created ON notes(created)"
V3_BAD = "ALTER TABLE notes ADD COLUMN tag TEXT; INSERT INTO no_such_table VALUES (1)"
V3 = "ALTER TABLE notes ADD COLUMN tag TEXT"


def columns(db_path: Path, table: str = "notes") -> list[str]:
    with mpwriter.reader(db_path) as db:
        return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def recorded(db_path: Path) -> list[tuple[int, str]]:
    with mpwriter.reader(db_path) as db:
        rows = db.execute("SELECT version, description FROM mpwriter_migrations ORDER BY version")
        return [(int(v), str(d)) for v, d in rows]


def test_migrations_apply_once_in_order_across_starts_and_a_restart(db_path: Path) -> None:
    with mpwriter.start(db_path, migrations=[V1, V2], context="fork") as writer:
        writer.execute("INSERT INTO notes(body, created) VALUES ('a', 'today')")
        sigkill_and_wait(writer.stats()["pid"])
        # The supervisor starts a new writer, which opens the database again:
        # V2 run twice would fail ("duplicate column name") and the writer with it.
        writer.execute("INSERT INTO notes(body, created) VALUES ('b', 'today')")
        assert writer.stats()["restarts"] == 1
    with mpwriter.start(db_path, migrations=[V1, V2, V3], context="fork") as writer:
        writer.execute("INSERT INTO notes(body, tag) VALUES ('c', 'x')")
    assert columns(db_path) == ["id", "body", "created", "tag"]
    assert [version for version, _ in recorded(db_path)] == [1, 2, 3]
    assert recorded(db_path)[0][1] == V1


def test_a_failing_migration_stops_the_start_and_applies_nothing_of_itself(
    db_path: Path,
) -> None:
    with pytest.raises(mpwriter.MigrationFailed) as failed:
        mpwriter.start(db_path, migrations=[V1, V2, V3_BAD], context="fork")
    message = str(failed.value)
    assert "migration 3 of 3" in message
    assert "no such table: no_such_table" in message
    assert "migrations 1-2 stay applied" in message
    assert columns(db_path) == ["id", "body", "created"]  # V3_BAD's first statement undone
    assert [version for version, _ in recorded(db_path)] == [1, 2]
    # The lock was released: the fixed list starts, and applies only the third.
    with mpwriter.start(db_path, migrations=[V1, V2, V3], context="fork") as writer:
        writer.execute("INSERT INTO notes(body) VALUES ('after the fix')")
    assert columns(db_path) == ["id", "body", "created", "tag"]


def add_flag(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE notes ADD COLUMN flag INTEGER NOT NULL DEFAULT 0")
    conn.execute("UPDATE notes SET flag = 1")


def commits_itself(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE notes ADD COLUMN oops TEXT")
    conn.execute("COMMIT")


def test_a_function_migration_runs_in_the_writer_and_may_not_end_its_transaction(
    db_path: Path, start_method: str
) -> None:
    with mpwriter.start(db_path, migrations=[V1], context=start_method) as writer:
        writer.execute("INSERT INTO notes(body) VALUES ('old')")
    with mpwriter.start(db_path, migrations=[V1, add_flag], context=start_method):
        pass
    with mpwriter.reader(db_path) as db:
        assert db.execute("SELECT body, flag FROM notes").fetchall() == [("old", 1)]
    assert recorded(db_path)[1][1].endswith("test_migrations.add_flag")
    with pytest.raises(mpwriter.MigrationFailed, match="ended its own transaction"):
        mpwriter.start(db_path, migrations=[V1, add_flag, commits_itself], context=start_method)
    assert len(recorded(db_path)) == 2


def test_a_database_ahead_of_the_list_is_refused(db_path: Path) -> None:
    with mpwriter.start(db_path, migrations=[V1, V2], context="fork"):
        pass
    with pytest.raises(mpwriter.MigrationFailed, match="has 2 migrations applied"):
        mpwriter.start(db_path, migrations=[V1], context="fork")


def test_without_migrations_no_table_is_made(db_path: Path) -> None:
    with mpwriter.start(db_path, init=V1.replace("TABLE", "TABLE IF NOT EXISTS"), context="fork"):
        pass
    with mpwriter.reader(db_path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "mpwriter_migrations" not in tables


def test_migrations_must_be_scripts_or_functions(db_path: Path) -> None:
    with pytest.raises(TypeError, match="migrations must be a list"):
        mpwriter.start(db_path, migrations=V1, context="fork")
    with pytest.raises(TypeError, match="migrations must be a list"):
        mpwriter.start(db_path, migrations=[V1, 42], context="fork")  # type: ignore[list-item]


# -- PostgreSQL ------------------------------------------------------------------

PG_V1 = "CREATE TABLE notes(id serial PRIMARY KEY, body text NOT NULL)"
PG_V2 = "ALTER TABLE notes ADD COLUMN created text"
PG_V3_BAD = "ALTER TABLE notes ADD COLUMN tag text; INSERT INTO no_such_table VALUES (1)"


def pg_columns(url: str) -> list[str]:
    with mpwriter.reader(url) as db:
        rows: list[Any] = db.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_name = 'notes' ORDER BY ordinal_position"
        ).fetchall()
    return [row[0] for row in rows]


def test_postgres_migrations_apply_once_and_a_failing_one_leaves_nothing(pg_fresh: str) -> None:
    with mpwriter.start(pg_fresh, migrations=[PG_V1, PG_V2], context="fork") as writer:
        writer.execute("INSERT INTO notes(body, created) VALUES ('a', 'today')")
    with pytest.raises(mpwriter.MigrationFailed) as failed:
        mpwriter.start(pg_fresh, migrations=[PG_V1, PG_V2, PG_V3_BAD], context="fork")
    assert "migration 3 of 3" in str(failed.value)
    assert "no_such_table" in str(failed.value)
    assert pg_columns(pg_fresh) == ["id", "body", "created"]
    with mpwriter.reader(pg_fresh) as db:
        versions = db.execute("SELECT version FROM mpwriter_migrations ORDER BY 1").fetchall()
    assert [v for (v,) in versions] == [1, 2]


def test_a_migration_that_breaks_a_foreign_key_fails_and_a_table_rebuild_works(
    db_path: Path,
) -> None:
    schema = (
        "CREATE TABLE authors(id INTEGER PRIMARY KEY, name TEXT);"
        "CREATE TABLE books(id INTEGER PRIMARY KEY, author INTEGER REFERENCES authors(id));"
        "INSERT INTO authors VALUES (1, 'Ada'); INSERT INTO books VALUES (1, 1)"
    )
    rebuild = (
        "CREATE TABLE authors_new(id INTEGER PRIMARY KEY, name TEXT NOT NULL);"
        "INSERT INTO authors_new SELECT id, coalesce(name, '?') FROM authors;"
        "DROP TABLE authors; ALTER TABLE authors_new RENAME TO authors"
    )
    orphan = "DELETE FROM authors WHERE id = 1"
    with pytest.raises(mpwriter.MigrationFailed, match="break a foreign key"):
        mpwriter.start(db_path, migrations=[schema, rebuild, orphan], context="fork")
    assert [version for version, _ in recorded(db_path)] == [1, 2]
    with mpwriter.reader(db_path) as db:
        assert db.execute("SELECT count(*) FROM authors").fetchone() == (1,)
    # Foreign keys are on again once the migrations are applied.
    with (
        mpwriter.start(db_path, migrations=[schema, rebuild], context="fork") as writer,
        pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"),
    ):
        writer.execute("INSERT INTO books(id, author) VALUES (2, 99)")


def _start_with_migrations(url: str, barrier: Any, outcome: Any) -> None:
    barrier.wait(10)
    try:
        with mpwriter.start(url, migrations=[PG_V1, PG_V2], context="fork"):
            pass
    except BaseException as exc:
        outcome.send(f"{type(exc).__name__}: {exc}")
    else:
        outcome.send("ok")


def test_postgres_writers_starting_at_once_apply_each_migration_once(pg_fresh: str) -> None:
    # Two owners (as on two machines) start together: ALTER TABLE ... ADD COLUMN
    # applied twice would fail one of them.
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    pipes = [context.Pipe(duplex=False) for _ in range(2)]
    owners = [
        context.Process(target=_start_with_migrations, args=(pg_fresh, barrier, send))
        for _, send in pipes
    ]
    for owner in owners:
        owner.start()
    try:
        outcomes = []
        for receive, _ in pipes:
            assert receive.poll(30), "an owner did not report"
            outcomes.append(receive.recv())
        assert outcomes == ["ok", "ok"]
    finally:
        for owner in owners:
            owner.join(10)
            if owner.exitcode is None:
                owner.kill()
                owner.join(10)
    assert pg_columns(pg_fresh) == ["id", "body", "created"]
    with mpwriter.reader(pg_fresh) as db:
        assert db.execute("SELECT count(*) FROM mpwriter_migrations").fetchone()[0] == 2
