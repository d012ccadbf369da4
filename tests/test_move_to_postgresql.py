"""docs/howto-move-to-postgresql.md, run as a reader runs it: SQLite to PostgreSQL with pgloader.

The page's files (the Python blocks whose first line names a file) are
written to a directory, and its shell commands are run there in the page's
order, with the page's example URL replaced by a scratch database's. Then
every row of both databases is compared, and the app's checks must print the
same line on PostgreSQL as on SQLite (the line the page shows).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "howto-move-to-postgresql.md"
EXAMPLE_URL = "postgresql://app@db.example:5432/shop"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
FILE_NAME = re.compile(r"#\s*([\w.-]+\.py)\b")
TABLES = {"customers": "id", "orders": "id", "order_lines": "order_id, line"}


def page_blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(PAGE.read_text())]


def commands(script: str) -> list[str]:
    """The commands of a ```sh block: continuation lines joined, comments dropped."""
    joined = script.replace("\\\n", " ")
    return [line.split("#", 1)[0].strip() for line in joined.splitlines() if line.strip()]


def run(command: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


Rows = list[tuple[object, ...]]


def rows(sqlite_path: Path, url: str, table: str, order: str) -> tuple[Rows, Rows]:
    import psycopg

    with contextlib.closing(sqlite3.connect(sqlite_path)) as lite:
        before = lite.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
    with psycopg.connect(url) as server:
        after = server.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
    # SQLite keeps a BOOLEAN as 0 or 1; PostgreSQL's comes back as a bool.
    return before, [tuple(int(v) if isinstance(v, bool) else v for v in row) for row in after]


@pytest.mark.timeout(300)  # pgloader starts a Lisp image; five scripts start a writer each
def test_the_move_to_postgresql_page_moves_every_row_and_the_app_checks_pass(
    pg_url: str, tmp_path: Path
) -> None:
    if shutil.which("pgloader") is None:
        pytest.skip("pgloader is not installed (apt-get install pgloader; .ci/run installs it)")
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The page says `python`: this interpreter (a wrapper, since a symlink to a
    # venv's interpreter from elsewhere would not be in the venv).
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    work = tmp_path / "app"
    work.mkdir()

    printed: list[str] = []
    expected: list[str] = []
    ran = 0
    for language, text in page_blocks():  # the files first: a command may use a later one
        named = FILE_NAME.match(text)
        if language == "python" and named:
            (work / named.group(1)).write_text(text)
    for language, text in page_blocks():
        if language == "sh":
            for command in commands(text):
                printed.append(run(command.replace(EXAMPLE_URL, pg_url), work, env))
                ran += 1
        elif language == "text" and "checks passed" in text:
            expected.append(text.strip())
    assert ran == 6, "the page's commands changed: this test runs them in order"

    filled, check_sqlite, schema, _pgloader, sequences, check_postgres = printed
    assert filled.strip() == "filled"
    assert schema.strip() == "schema ready"
    assert sequences.strip() == "sequences moved"
    assert len(expected) == 2
    assert expected[0] == expected[1]
    assert check_sqlite.strip() == expected[0]
    assert check_postgres.strip() == expected[0]
    for table, order in TABLES.items():
        before, after = rows(work / "shop.db", pg_url, table, order)
        assert before, table
        assert after == before, table
    with psycopg.connect(pg_url) as server:
        foreign_keys = server.execute(
            "SELECT conrelid::regclass::text, condeferrable, condeferred, confdeltype"
            " FROM pg_constraint WHERE contype = 'f' ORDER BY 1"
        ).fetchall()
    # As the app's PostgreSQL schema declares them, after pgloader's copy.
    assert foreign_keys == [("order_lines", False, False, "c"), ("orders", True, True, "a")]
