"""WAL checkpoints run between batches, never inside a commit.

The engine-level tests drive `SqliteEngine` directly: when a checkpoint runs
relative to a COMMIT is invisible through the public API without racing the
writer's idle moments, and `Engine.tidy` is the seam's contract.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import pytest

import mpwriter
from mpwriter._wire.frames import Kind, Request
from mpwriter._writer.batch import Counters, Work
from mpwriter._writer.sqlite import (
    BACKSTOP_CHECKPOINT_FRAMES,
    IDLE_CHECKPOINT_FRAMES,
    SqliteEngine,
    open_sqlite_engine,
)

SCHEMA = "CREATE TABLE pages(id INTEGER PRIMARY KEY, blob BLOB);"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[SqliteEngine]:
    # The engine installs its own SIGALRM handler; pytest-timeout uses SIGALRM.
    previous = signal.getsignal(signal.SIGALRM)
    state = SimpleNamespace(busy_until=0.0)
    opened = open_sqlite_engine(str(tmp_path / "c.db"), "NORMAL", SCHEMA, Counters(), state, None)
    try:
        yield opened
    finally:
        opened.close()
        signal.signal(signal.SIGALRM, previous)


def write_pages(engine: SqliteEngine, pages: int) -> None:
    """One batch (one COMMIT) that writes about ``pages`` WAL frames of 4 KiB."""
    sql = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
        " INSERT INTO pages(blob) SELECT zeroblob(4000) FROM n"
    )
    request = Request(Kind.EXECUTE, 1, 1, 0, b"")
    work = Work(request, time.monotonic() + 30, time.monotonic(), (sql, (pages,)))
    ((_, reply),) = engine.run([work])
    assert reply  # an encoded OK reply (an error would have been encoded too)
    assert engine.unchecked_frames() >= pages


def test_a_commit_never_checkpoints_the_wal_itself(engine: SqliteEngine) -> None:
    # SQLite's autocheckpoint would have copied these frames back inside COMMIT.
    write_pages(engine, IDLE_CHECKPOINT_FRAMES + 100)
    assert engine.unchecked_frames() > IDLE_CHECKPOINT_FRAMES


def test_an_idle_writer_checkpoints_once_the_wal_passes_its_threshold(
    engine: SqliteEngine,
) -> None:
    write_pages(engine, IDLE_CHECKPOINT_FRAMES // 2)
    engine.tidy(idle=True)
    assert engine.unchecked_frames() >= IDLE_CHECKPOINT_FRAMES // 2  # not due yet
    write_pages(engine, IDLE_CHECKPOINT_FRAMES // 2 + 10)
    engine.tidy(idle=True)
    assert engine.unchecked_frames() == 0


def test_a_busy_writer_checkpoints_only_at_the_backstop(engine: SqliteEngine) -> None:
    write_pages(engine, IDLE_CHECKPOINT_FRAMES + 100)
    engine.tidy(idle=False)
    assert engine.unchecked_frames() > IDLE_CHECKPOINT_FRAMES  # callers are waiting
    write_pages(engine, BACKSTOP_CHECKPOINT_FRAMES)
    engine.tidy(idle=False)
    assert engine.unchecked_frames() == 0


def test_a_checkpointed_wal_rewinds_with_the_next_batch(engine: SqliteEngine) -> None:
    write_pages(engine, IDLE_CHECKPOINT_FRAMES + 100)
    engine.tidy(idle=True)
    write_pages(engine, 10)
    # Rewound: the frames of the last batch start again at the WAL's head.
    assert engine.unchecked_frames() < 100


def test_the_wal_stays_bounded_under_a_stream_of_writes(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    text = "x" * 3000  # about a page a row: the WAL grows by a frame or more a write
    for seq in range(6 * IDLE_CHECKPOINT_FRAMES):
        writer.execute("INSERT INTO items(client, seq, payload) VALUES (1, ?, ?)", (seq, text))
    wal = Path(str(db_path) + "-wal")
    # Never checkpointed, 6,000 commits of a new page each would exceed 6,000 frames.
    frames = wal.stat().st_size // 4096
    assert frames < 2 * BACKSTOP_CHECKPOINT_FRAMES
    with closing(sqlite3.connect(db_path)) as conn:
        assert (
            conn.execute("SELECT count(*) FROM items").fetchone()[0] == 6 * IDLE_CHECKPOINT_FRAMES
        )


def test_a_long_read_does_not_make_every_batch_checkpoint(
    engine: SqliteEngine, tmp_path: Path
) -> None:
    write_pages(engine, 10)
    with closing(sqlite3.connect(tmp_path / "c.db", isolation_level=None)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM pages").fetchone()  # holds its snapshot
        write_pages(engine, IDLE_CHECKPOINT_FRAMES + 10)
        engine.tidy(idle=True)
        assert engine.checkpoints == 1
        assert engine.unchecked_frames() > IDLE_CHECKPOINT_FRAMES  # the reader needs them
        for _ in range(5):
            write_pages(engine, 10)
            engine.tidy(idle=True)
        assert engine.checkpoints == 1  # not again for every batch
        write_pages(engine, IDLE_CHECKPOINT_FRAMES)
        engine.tidy(idle=True)
        assert engine.checkpoints == 2  # as many new frames again: due
        reader.execute("COMMIT")
    write_pages(engine, IDLE_CHECKPOINT_FRAMES)
    engine.tidy(idle=True)
    assert engine.unchecked_frames() == 0  # the reader is gone: all copied back
