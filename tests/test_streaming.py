"""Streamed executemany: any iterable, read a chunk at a time, applied atomically.

Past its first chunk an executemany's rows are pickled into a handed-over
file while the iterable is read, and the writer reads them back a chunk at a
time. These tests pin what that must keep: all rows or none (a generator
that raises, a bad row in a late chunk, a batch the writer replays), the
caller's memory bounded whatever the number of rows, the same results from
every driver, and the plain path where no file can be handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import select
import sqlite3
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

import mpwriter
from conftest import SCHEMA, Gate, count_rows, reap_pid
from mpwriter import testing
from mpwriter._caller import blocking, calls
from mpwriter._wire import frames as _wire

pytestmark = pytest.mark.skipif(not _wire.CAN_HAND_OVER, reason="needs os.memfd_create")

INSERT = "INSERT INTO items(client, seq, payload) VALUES (?, ?, ?)"
# Several chunks, whatever the chunk size (at most STREAM_CHUNK_ROWS_MAX rows).
MANY = 4 * calls.STREAM_CHUNK_ROWS_MAX + 123


def rows(client: int, count: int) -> Iterator[tuple[int, int, str]]:
    """Distinct ~100-byte rows, each made only when it is read."""
    return ((client, seq, f"{seq:09d}".ljust(100, "x")) for seq in range(count))


def failing_rows(client: int, count: int, fail_at: int) -> Iterator[tuple[int, int, str]]:
    for row in rows(client, count):
        if row[1] == fail_at:
            raise LookupError("the source of the rows failed")
        yield row


def open_request_files() -> set[tuple[int, int]]:
    """The request files (memfd "mpwriter-request") this process has open, by identity.

    Compared before and after a call, these show the call's own: another
    test's handle left to the garbage collector may hold one meanwhile.
    """
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (listdir's own descriptor)
            if "mpwriter-request" in os.readlink(f"/proc/self/fd/{name}"):
                status = os.stat(f"/proc/self/fd/{name}")
                found.add((status.st_dev, status.st_ino))
    return found


def test_a_generator_is_streamed_and_applied_whole(writer: mpwriter.Writer, db_path: Path) -> None:
    result = writer.executemany(INSERT, rows(1, MANY))
    assert result.rowcount == MANY
    assert count_rows(db_path) == MANY
    with contextlib.closing(sqlite3.connect(db_path)) as reader:
        last = reader.execute("SELECT max(seq), count(DISTINCT seq) FROM items").fetchone()
    assert last == (MANY - 1, MANY)


def test_a_generator_that_raises_midway_sends_nothing(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    before = writer.stats()["requests"]  # stats() itself is not counted there
    files_before = open_request_files()
    with pytest.raises(LookupError, match="source of the rows failed"):
        writer.executemany(INSERT, failing_rows(1, MANY, fail_at=MANY - 5))
    assert open_request_files() - files_before == set(), "the rows' file was left open"
    figures = writer.stats()
    assert figures["requests"] == before
    assert figures["dropped_partial_requests"] == 0  # no file was handed over either
    assert count_rows(db_path) == 0
    assert writer.execute(INSERT, (2, 0, "after")).rowcount == 1


def test_a_bad_row_in_a_late_chunk_applies_no_row(writer: mpwriter.Writer, db_path: Path) -> None:
    def with_duplicate() -> Iterator[tuple[int, int, str]]:
        yield from rows(1, MANY)
        yield (1, 7, "a duplicate of row 7: UNIQUE(client, seq)")

    with pytest.raises(sqlite3.IntegrityError):
        writer.executemany(INSERT, with_duplicate())
    assert count_rows(db_path) == 0


def test_a_list_with_a_bad_last_row_applies_no_row(writer: mpwriter.Writer, db_path: Path) -> None:
    params: list[tuple[object, ...]] = list(rows(1, MANY))
    params.append((1, MANY, "one parameter too many", "!"))
    with pytest.raises(sqlite3.ProgrammingError):
        writer.executemany(INSERT, params)
    assert count_rows(db_path) == 0
    assert writer.executemany(INSERT, params[:-1]).rowcount == MANY


def test_an_unpicklable_row_in_a_late_chunk_sends_nothing(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    def with_lambda() -> Iterator[tuple[object, ...]]:
        yield from rows(1, MANY)
        yield (1, MANY, lambda: "no pickle for me")

    with pytest.raises(mpwriter.NotPicklable):
        writer.executemany(INSERT, with_lambda())
    assert count_rows(db_path) == 0


class Label(str):
    """A str subclass: marshal refuses it, pickle takes it, SQLite binds it."""


def test_rows_marshal_refuses_are_pickled_from_that_chunk_on(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    def mixed() -> Iterator[tuple[object, ...]]:
        for client, seq, payload in rows(1, MANY):
            late = seq >= MANY - calls.STREAM_CHUNK_ROWS_MAX
            yield (client, seq, Label(payload) if late else bytearray(payload.encode()))

    assert writer.executemany(INSERT, mixed()).rowcount == MANY
    with contextlib.closing(sqlite3.connect(db_path)) as reader:
        kinds = reader.execute(
            "SELECT typeof(payload), count(*) FROM items GROUP BY 1 ORDER BY 1"
        ).fetchall()
    # bytearray goes as bytes either way: SQLite stores both as a blob
    assert kinds == [
        ("blob", MANY - calls.STREAM_CHUNK_ROWS_MAX),
        ("text", calls.STREAM_CHUNK_ROWS_MAX),
    ]


def test_a_streamed_request_runs_whole_again_when_its_batch_is_replayed(
    writer: mpwriter.Writer, db_path: Path, gate: Gate
) -> None:
    """OR FAIL keeps the row written before its conflict, so the writer rolls
    the batch back and runs it again without that request: the streamed rows,
    already read once, must all be read again."""
    gate.hold(writer)
    streamed = writer.submit_many(INSERT, rows(1, MANY))
    culprit = writer.submit("INSERT OR FAIL INTO items(client, seq) VALUES (9, 1), (9, 1)")
    gate.release()
    assert gate.future.result(timeout=10) == "released"
    with pytest.raises(sqlite3.IntegrityError):
        culprit.result(timeout=30)
    assert streamed.result(timeout=30).rowcount == MANY
    assert writer.stats()["replayed_batches"] == 1
    assert count_rows(db_path) == MANY


def test_submit_many_and_aexecutemany_stream_a_generator(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    future = writer.submit_many(INSERT, rows(1, MANY))
    assert future.result(timeout=30).rowcount == MANY

    async def load() -> int:
        result = await writer.aexecutemany(INSERT, rows(2, MANY))
        with pytest.raises(LookupError):
            await writer.aexecutemany(INSERT, failing_rows(3, MANY, fail_at=MANY - 1))
        return result.rowcount

    assert asyncio.run(load()) == MANY
    assert count_rows(db_path) == 2 * MANY


def test_without_hand_over_the_rows_are_gathered_and_sent_as_frames(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    """Where memfd does not exist: the same results, through today's path."""
    with testing.inject(hand_over=False):
        assert writer.executemany(INSERT, rows(1, 20_000)).rowcount == 20_000
        with pytest.raises(LookupError):
            writer.executemany(INSERT, failing_rows(2, 20_000, fail_at=19_999))
    assert count_rows(db_path) == 20_000


def test_a_short_iterable_goes_as_an_ordinary_request(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    few = calls.STREAM_FIRST_ROWS - 1
    assert writer.executemany(INSERT, rows(1, few)).rowcount == few
    assert writer.executemany(INSERT, iter([])).rowcount in (0, -1)
    assert count_rows(db_path) == few


STREAMED_ROWS = 300_000
# Holding all the rows would take ~70 MB of Python objects (and their pickle
# ~35 MB more); streamed, one chunk of at most 10,000 rows and its pickle.
PEAK_PYTHON_BYTES_MAX = 16 << 20


# The writer's resident set may grow by SQLite's page cache (2 MB by default)
# and one chunk; holding the rows would add ~100 MB.
WRITER_GROWTH_MAX_KB = 24 << 10


def memory_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_a_300000_row_generator_costs_each_side_one_chunk_of_memory(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    """The caller's Python allocations, traced in a forked child from the
    call's start; the writer's peak resident set (VmHWM, reset first)."""
    writer_pid = writer.stats()["pid"]
    with open(f"/proc/{writer_pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    writer_before = memory_kb(writer_pid, "VmRSS")
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            tracemalloc.start()
            outcome = writer.executemany(INSERT, rows(1, STREAMED_ROWS), timeout=60)
            peak = tracemalloc.get_traced_memory()[1]
            os.write(result_w, f"{outcome.rowcount} {peak}".encode())
        finally:
            os._exit(0)
    os.close(result_w)
    try:
        assert select.select([result_r], [], [], 60.0)[0], "the child did not report"
        report = os.read(result_r, 100).decode()
    finally:
        os.close(result_r)
        reap_pid(pid)
    rowcount, peak = (int(part) for part in report.split())
    assert rowcount == STREAMED_ROWS
    assert peak < PEAK_PYTHON_BYTES_MAX, f"the caller's Python peak was {peak / 2**20:.1f} MiB"
    growth = memory_kb(writer_pid, "VmHWM") - writer_before
    assert growth < WRITER_GROWTH_MAX_KB, f"the writer grew by {growth / 1024:.1f} MiB"
    assert count_rows(db_path) == STREAMED_ROWS


def test_schema_is_what_these_tests_insert_into() -> None:
    assert "UNIQUE (client, seq)" in SCHEMA


def test_a_chunk_the_writer_cannot_read_applies_no_row(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    """The writer fails the request if any chunk of the file is unreadable,
    however many rows it ran before: the savepoint takes them all back."""
    pool = writer._link.pool
    fd = calls.new_request_file(pool)
    source = rows(1, MANY)
    written = calls.write_rows(fd, [list(itertools.islice(source, 1_000))], source)
    offset = last_chunk = 0
    while offset < written:  # walk the records to the last chunk's
        last_chunk = offset + _wire.STREAM_RECORD.size
        offset = last_chunk + _wire.STREAM_RECORD.unpack(os.pread(fd, 8, offset))[0]
    os.pwrite(fd, b"\x00" * 16, last_chunk)  # its first bytes: no pickle any more
    now = time.monotonic()
    head = pickle.dumps((now + 30, now, (INSERT, None)))
    length = calls.finish_rows(fd, written, head)
    step = calls.request_streamed(
        pool, writer._link.request_fd, _wire.Kind.EXECUTEMANY, fd, length, now + 30
    )
    with pytest.raises(ValueError, match="could not be decoded"):
        blocking.run(step)
    assert count_rows(db_path) == 0
    assert writer.executemany(INSERT, rows(2, MANY)).rowcount == MANY
