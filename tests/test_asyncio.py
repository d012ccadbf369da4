"""asyncio: awaiting writes under a running loop, without blocking it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

import mpwriter
from conftest import Gate, count_rows


def add_row(conn: sqlite3.Connection, seq: int) -> int:
    return int(conn.execute("INSERT INTO items(seq) VALUES (?)", (seq,)).lastrowid or 0)


def test_many_concurrent_tasks_each_get_their_own_result(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    async def main() -> list[list[tuple[int]]]:
        tasks = [
            writer.aexecute("INSERT INTO items(client, seq) VALUES (1, ?) RETURNING seq", (n,))
            for n in range(300)
        ]
        return [result.rows for result in await asyncio.gather(*tasks)]

    rows = asyncio.run(main())
    assert rows == [[(n,)] for n in range(300)]
    assert count_rows(db_path) == 300


def test_the_other_async_calls(writer: mpwriter.Writer, db_path: Path) -> None:
    async def main() -> int:
        await writer.aexecutemany("INSERT INTO items(seq) VALUES (?)", [(1,), (2,)])
        await writer.aexecutescript(
            "INSERT INTO items(seq) VALUES (3); INSERT INTO items(seq) VALUES (4);"
        )
        rowid = await writer.acall(add_row, 5)
        with pytest.raises(sqlite3.IntegrityError):
            await writer.aexecute("INSERT INTO items(id) VALUES (?)", (rowid,))
        return int(rowid)

    assert asyncio.run(main()) == 5
    assert count_rows(db_path) == 5


def test_waiting_for_a_reply_does_not_block_the_loop(
    writer: mpwriter.Writer, db_path: Path, gate: Gate
) -> None:
    gate.hold(writer)  # the write below cannot be served until the gate opens

    async def main() -> tuple[int, int]:
        ticks = 0
        write = asyncio.ensure_future(writer.aexecute("INSERT INTO items(seq) VALUES (1)"))
        # The loop keeps running other work while the write waits: this
        # ticker makes 20 turns, then opens the gate from another thread.
        for _ in range(20):
            await asyncio.sleep(0)  # sleep-ok: yields one loop turn, no waiting
            ticks += 1
        assert not write.done()
        threading.Thread(target=gate.release).start()
        result = await write
        return ticks, result.rowcount

    assert asyncio.run(main()) == (20, 1)
    assert count_rows(db_path) == 1


def test_an_async_timeout_retires_the_pipe_and_the_next_call_gets_its_own_reply(
    writer: mpwriter.Writer, gate: Gate
) -> None:
    gate.hold(writer)

    async def main() -> list[tuple[str]]:
        with pytest.raises(mpwriter.Timeout):
            await writer.aexecute("INSERT INTO items(payload) VALUES ('late')", timeout=0.2)
        gate.release()
        result = await writer.aexecute(
            "INSERT INTO items(payload) VALUES ('next') RETURNING payload"
        )
        return result.rows

    assert asyncio.run(main()) == [("next",)]


def test_a_cancelled_call_leaves_the_handle_usable(writer: mpwriter.Writer, gate: Gate) -> None:
    gate.hold(writer)

    async def main() -> list[tuple[str]]:
        task = asyncio.ensure_future(writer.aexecute("INSERT INTO items(payload) VALUES ('x')"))
        await asyncio.sleep(0)  # sleep-ok: lets the task start, no waiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.release()
        result = await writer.aexecute("INSERT INTO items(payload) VALUES ('y') RETURNING payload")
        return result.rows

    assert asyncio.run(main()) == [("y",)]
