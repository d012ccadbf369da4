"""Typed calls: mypy --strict checks a user's call() arguments and knows its result."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed")

PROGRAM = textwrap.dedent(
    """
    import asyncio
    import sqlite3

    import mpwriter


    def add_item(conn: sqlite3.Connection, name: str, *, price: int = 0) -> int:
        return int(conn.execute("INSERT INTO t(x) VALUES (?)", (name,)).lastrowid or 0)


    def main(writer: mpwriter.Writer) -> None:
        reveal_type(writer.call(add_item, "pen", price=2))
        reveal_type(writer.call_with_timeout(5.0, add_item, "pen"))
        reveal_type(writer.submit_call(add_item, "pen"))
        reveal_type(writer.submit_call_with_timeout(5.0, add_item, "pen"))
        reveal_type(asyncio.run(writer.acall(add_item, "pen")))
        reveal_type(asyncio.run(writer.acall_with_timeout(5.0, add_item, "pen")))
        writer.call(add_item, 42)  # line 19: wrong argument type
        writer.submit_call(add_item, "pen", colour="red")  # line 20: no such argument
    """
)


def mypy_strict_with_errors(tmp_path: Path, source: str) -> str:
    """mypy --strict's report on ``source``, a user's program that has errors."""
    program = tmp_path / "user_program.py"
    program.write_text(source)
    stdout, stderr, status = mypy_api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(program)]
    )
    assert status == 1, stdout + stderr
    return stdout


def test_mypy_strict_checks_call_arguments_and_result_types(tmp_path: Path) -> None:
    stdout = mypy_strict_with_errors(tmp_path, PROGRAM)
    lines = [line.split(": ", 1)[1] for line in stdout.splitlines() if ": " in line]
    # Older mypy versions spell the types with their modules; newer ones do not.
    revealed = [
        line.removeprefix("note: Revealed type is ")
        .replace("builtins.", "")
        .replace("concurrent.futures._base.", "")
        for line in lines
        if line.startswith("note: Revealed type")
    ]
    assert revealed == ['"int"', '"int"', '"Future[int]"', '"Future[int]"', '"int"', '"int"'], (
        stdout
    )
    errors = [line for line in stdout.splitlines() if ": error: " in line]
    assert len(errors) == 2, stdout
    assert ":19: error: Argument 2" in errors[0]
    assert '"str"' in errors[0]
    assert ":20: error: Unexpected keyword argument" in errors[1]


READER_PROGRAM = textwrap.dedent(
    """
    import pathlib
    import sqlite3

    import mpwriter

    with mpwriter.reader("app.db") as db:
        reveal_type(db)
        (count,) = db.execute("SELECT count(*) FROM t").fetchone()
        names = [row[0] for row in db.execute("SELECT name FROM t")]
    with mpwriter.reader(pathlib.Path("app.db")) as file:
        reveal_type(file)
        file.row_factory = sqlite3.Row
    db.row_factory = sqlite3.Row  # line 14: not on a psycopg connection
    """
)


def test_mypy_strict_knows_what_reader_returns(tmp_path: Path) -> None:
    stdout = mypy_strict_with_errors(tmp_path, READER_PROGRAM)
    revealed = [line for line in stdout.splitlines() if "Revealed type" in line]
    assert len(revealed) == 2, stdout
    assert "mpwriter._caller.reader.Reader" in revealed[0], stdout
    assert "mpwriter._caller.reader.ReadConnection" in revealed[1], stdout
    errors = [line for line in stdout.splitlines() if ": error: " in line]
    assert len(errors) == 1, stdout
    assert ':14: error: "Reader" has no attribute "row_factory"' in errors[0], stdout
