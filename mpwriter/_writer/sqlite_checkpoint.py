"""WAL checkpoints, run by the writer between batches, never inside a COMMIT.

SQLite's autocheckpoint would run inside the COMMIT that crosses its
threshold, before that batch's replies are sent. The engine moves it out of
the way on the writer's connection and calls `Checkpoints.tidy` between
batches instead, which can tell how full the WAL is by reading the
wal-index header in the -shm file.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct

log = logging.getLogger("mpwriter")

# Checkpoints run off the commit path (SQLite's own autocheckpoint is moved
# out of the way on the writer's connection): when the loop is idle and the WAL holds at least
# this many frames not yet copied back (SQLite's default autocheckpoint
# threshold); or, if no idle moment comes, after a batch's replies were sent
# once it holds the backstop's number.
IDLE_CHECKPOINT_FRAMES = 1000
BACKSTOP_CHECKPOINT_FRAMES = 4000
# SQLite's own autocheckpoint stays on far above those, as a safety net: if
# reading the wal-index ever went wrong, the WAL still could not grow unbounded.
SAFETY_NET_CHECKPOINT_FRAMES = 10 * BACKSTOP_CHECKPOINT_FRAMES
# The wal-index header (https://www.sqlite.org/walformat.html, 2.2): mxFrame,
# the last valid frame, at byte 16; nBackfill, the last frame copied back into
# the database, at byte 96; both 32-bit in the host's byte order.
_WAL_INDEX = struct.Struct("=16xI76xI")


class Checkpoints:
    """The checkpoint policy of one writer connection; see the module docstring."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        """Open the -shm file and raise SQLite's autocheckpoint to the safety
        net; made after the user's init, which could otherwise lower it again."""
        self._conn = conn
        self.wal_index = _open_wal_index(conn)
        if self.wal_index is not None:
            conn.execute(f"PRAGMA wal_autocheckpoint={SAFETY_NET_CHECKPOINT_FRAMES}")
        self.checkpoints = 0  # attempted by `tidy`
        # Frames the last checkpoint could not copy back (a reader's snapshot
        # needed them); not counted as due again.
        self._left_behind = 0

    def unchecked_frames(self) -> int:
        """WAL frames not yet copied back into the database (a hint, not a promise).

        Read from the wal-index header in the -shm file: one pread, no lock,
        so a value torn by a concurrent update is possible and harmless here.
        """
        if self.wal_index is None:
            return 0  # no -shm to read: SQLite's autocheckpoint stays on
        header = os.pread(self.wal_index, _WAL_INDEX.size, 0)
        if len(header) < _WAL_INDEX.size:
            return 0  # not initialised yet: nothing written
        last_frame, backfilled = _WAL_INDEX.unpack(header)
        return max(0, int(last_frame) - int(backfilled))

    def tidy(self, idle: bool) -> None:
        """Checkpoint the WAL if it is due, between batches.

        ``idle``: nothing is in hand or queued, so no caller waits on this;
        the WAL is checkpointed once it holds `IDLE_CHECKPOINT_FRAMES`. Under
        sustained load (never idle) it is checkpointed once it holds
        `BACKSTOP_CHECKPOINT_FRAMES`, after the batch's replies were sent.
        Either way nothing commits between the checkpoint and the next batch,
        so a complete checkpoint lets that batch rewind the WAL to its start
        (a checkpoint from another thread never could). PASSIVE: it never
        waits for readers; a reader's open snapshot just leaves frames for
        the next time -- and the next attempt waits until as many new frames
        again have come, so that a long read does not cost every batch a
        checkpoint. Failures are logged: the next commit stays correct.
        """
        if self.wal_index is None or self._conn.in_transaction:
            return  # SQLite's autocheckpoint stays on without a -shm to read
        header = os.pread(self.wal_index, _WAL_INDEX.size, 0)  # as unchecked_frames()
        if len(header) < _WAL_INDEX.size:
            return
        last_frame, backfilled = _WAL_INDEX.unpack(header)
        due = IDLE_CHECKPOINT_FRAMES if idle else BACKSTOP_CHECKPOINT_FRAMES
        if last_frame - backfilled - self._left_behind < due:
            return
        self.checkpoints += 1
        try:
            row = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            log.exception("mpwriter: checkpoint failed")
            return
        # (busy, frames in the WAL, frames copied back): what a reader kept.
        self._left_behind = max(0, row[1] - row[2]) if row else 0

    def close(self) -> None:
        """Let go of the -shm descriptor (before the connection closes)."""
        if self.wal_index is not None:
            os.close(self.wal_index)
            self.wal_index = None


def _open_wal_index(conn: sqlite3.Connection) -> int | None:
    """A read-only descriptor of the database's -shm file, or None if it has none
    (an in-memory database, or ``locking_mode=EXCLUSIVE``, keeps it in memory)."""
    # As a blob: bytes whatever text factory ``init`` set on the connection.
    row = conn.execute(
        "SELECT CAST(file AS BLOB) FROM pragma_database_list WHERE name = 'main'"
    ).fetchone()
    if not row or not row[0]:
        return None
    try:
        return os.open(os.fsdecode(row[0]) + "-shm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
