"""Bulk requests whose payload is handed over as a file instead of queued frames.

A request of `_wire.HAND_OVER_MIN` bytes or more travels as an anonymous file
(memfd) on the side socket, and one empty frame keeps its place in the queue.
These tests pin what that must mean: a bulk request needs no room in the
queue, a caller killed half-way leaves nothing behind, and a payload lost
with a dead writer is answered "not applied" -- exactly once.

They drive the handle's request path one step at a time (`_prepare`,
`_send`, `_await_reply`): the step under test is "sent", which the public
calls never return at.
"""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path

import pytest

import mpwriter
from conftest import SCHEMA, Gate, count_rows, reap_pid
from mpwriter import _reply, _wire

pytestmark = pytest.mark.skipif(not _wire.CAN_HAND_OVER, reason="needs os.memfd_create")

INSERT = "INSERT INTO items(client, seq, payload) VALUES (?, ?, ?)"
QUEUE_SIZE = 1 << 16


def bulk_rows(client: int, count: int) -> list[tuple[int, int, str]]:
    return [(client, seq, f"{seq:08d}".ljust(100, "x")) for seq in range(count)]


def test_a_bulk_request_larger_than_the_queue_is_sent_while_the_writer_is_busy(
    db_path: Path, gate: Gate
) -> None:
    """As frames, 1 MB could not enter a 64 KiB queue before the writer read
    it (QueueFull at the deadline); handed over, it is sent at once."""
    with mpwriter.start(db_path, init=SCHEMA, context="fork", queue_size=QUEUE_SIZE) as writer:
        gate.hold(writer)
        rows = bulk_rows(1, 10_000)
        deadline, payload = writer._prepare(_wire.Kind.EXECUTEMANY, (INSERT, rows), 10.0)
        assert len(payload) > 10 * QUEUE_SIZE
        slot = writer._borrow_slot(deadline)
        request_id = writer._send(
            _wire.Kind.EXECUTEMANY, payload, slot.number, time.monotonic() + 1.0
        )
        behind = writer.submit(INSERT, (2, 0, "queued behind the bulk request"))
        gate.release()
        assert gate.future.result(timeout=10) == "released"
        reply = writer._await_reply(slot, request_id, deadline)
        assert _reply.unpack_reply(reply, request_id)[0] == len(rows)
        assert behind.result(timeout=10).rowcount == 1
    assert count_rows(db_path) == len(rows) + 1


def test_a_caller_killed_between_hand_over_and_frame_leaves_nothing_behind(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    payload_sent_r, payload_sent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hand the payload over, then die before the frame
        try:
            deadline, payload = writer._prepare(
                _wire.Kind.EXECUTEMANY, (INSERT, bulk_rows(3, 5_000)), 10.0
            )
            writer._hand_over(payload, 1, deadline)
            os.write(payload_sent_w, b"!")
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(payload_sent_w)
    assert select.select([payload_sent_r], [], [], 10.0)[0], "the child did not hand over"
    os.close(payload_sent_r)
    reap_pid(pid)
    # The writer drops it at its next housekeeping (once a second).
    end = time.monotonic() + 10.0
    while writer.stats()["dropped_partial_requests"] == 0:
        assert time.monotonic() < end, "the orphaned payload was never dropped"
        select.select([], [], [], 0.05)  # sleep-ok: paces a poll; the condition is asserted
    assert writer.execute(INSERT, (4, 0, "after")).rowcount == 1
    assert count_rows(db_path) == 1


def test_a_frame_whose_payload_was_lost_is_answered_not_applied_once(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    """What a successor sees when the writer that died had taken the file."""
    deadline = time.monotonic() + 10.0
    slot = writer._borrow_slot(deadline)
    request_id = writer._next_request_id()
    frame = _wire.encode_frame(
        _wire.Kind.EXECUTEMANY,
        _wire.WHOLE | _wire.HANDED_OVER,
        writer._local.sender,
        request_id,
        slot.number,
        b"",
    )
    os.write(writer._request_fd, frame)
    reply = writer._await_reply(slot, request_id, deadline)
    with pytest.raises(mpwriter.WriterCrashed, match="not applied"):
        _reply.unpack_reply(reply, request_id)
    writer._local.free.append(slot)
    # The same pipe serves the next request: no second answer was left in it.
    assert writer.execute(INSERT, (5, 0, "next")).rowcount == 1
    assert writer.stats()["lost_requests"] == 1
    assert count_rows(db_path) == 1
