"""Bulk requests whose payload is handed over as a file instead of queued frames.

A request of `_wire.HAND_OVER_MIN` bytes or more travels as an anonymous file
(memfd) on the side socket, and one empty frame keeps its place in the queue.
These tests pin what that must mean: a bulk request needs no room in the
queue, a caller killed half-way leaves nothing behind, and a payload lost
with a dead writer is answered "not applied" -- exactly once.

Where the step under test is one the public calls never stop at (a payload
handed over and its frame never sent, a frame whose payload is gone), they
write to the handle's pipes themselves.
"""

from __future__ import annotations

import itertools
import os
import pickle
import select
import signal
import socket
import sqlite3
import time
from contextlib import closing
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

import mpwriter
from conftest import SCHEMA, Gate, count_rows, reap_pid, writer_inbox
from mpwriter import testing
from mpwriter._caller import blocking as _blocking
from mpwriter._caller import calls as _calls
from mpwriter._wire import frames as _wire
from mpwriter._wire import replies as _reply
from mpwriter._wire.state import SharedState
from mpwriter._writer import loop as _writer
from mpwriter._writer.batch import Counters
from mpwriter._writer.engine import WriterConfig, open_engine

pytestmark = pytest.mark.skipif(not _wire.CAN_HAND_OVER, reason="needs os.memfd_create")

INSERT = "INSERT INTO items(client, seq, payload) VALUES (?, ?, ?)"
QUEUE_SIZE = 1 << 16
# A request id no call of these tests' handles reaches (ids are 32 bits).
STRAY_REQUEST_ID = 0xFFFF0000


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
        assert len(pickle.dumps(rows)) > 10 * QUEUE_SIZE
        # submit_many returns once its request is sent: as frames, it could
        # not be while the writer is held (QueueFull after its timeout).
        bulk = writer.submit_many(INSERT, rows, timeout=10.0)
        behind = writer.submit(INSERT, (2, 0, "queued behind the bulk request"))
        gate.release()
        assert gate.future.result(timeout=10) == "released"
        assert bulk.result(timeout=10).rowcount == len(rows)
        assert behind.result(timeout=10).rowcount == 1
    assert count_rows(db_path) == len(rows) + 1


def test_a_caller_killed_between_hand_over_and_frame_leaves_nothing_behind(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    payload_sent_r, payload_sent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hand the payload over, then die before the frame
        try:
            now = time.monotonic()
            deadline = now + 10.0
            body = (INSERT, bulk_rows(3, 5_000))
            payload = pickle.dumps((deadline, now, body), _wire.PICKLE_PROTOCOL)
            _blocking.run(_calls.hand_over(writer._link.pool, payload, 1, deadline))
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
    writer.stats()  # pools a reply pipe
    slot = writer._link.pool.local.free.pop()
    request_id = STRAY_REQUEST_ID
    frame = _wire.encode_frame(
        _wire.Kind.EXECUTEMANY,
        _wire.WHOLE | _wire.HANDED_OVER,
        writer._link.pool.local.sender,
        request_id,
        slot.number,
        b"",
        testing.frame_key(writer),
    )
    os.write(writer._link.request_fd, frame)
    assert select.select([slot.fd], [], [], 10.0)[0], "the writer did not answer the frame"
    reply = _reply.read_reply(slot.fd, request_id)
    assert isinstance(reply, bytes)  # whole: a short error reply
    with pytest.raises(mpwriter.WriterCrashed, match="not applied"):
        _reply.unpack_reply(reply)
    writer._link.pool.local.free.append(slot)
    # The same pipe serves the next request: no second answer was left in it.
    assert writer.execute(INSERT, (5, 0, "next")).rowcount == 1
    assert writer.stats()["lost_requests"] == 1
    assert count_rows(db_path) == 1


def count_replies_after_a_mid_chunk_reregistration(directory: str) -> tuple[int, int]:
    """Drive a real `WriterLoop` (in this process) through the race; return
    (replies on the re-registered pipe, rows written)."""
    config = WriterConfig(
        path=os.path.join(directory, "race.db"),
        synchronous="NORMAL",
        init="CREATE TABLE t(x)",
        max_batch=64,
    )
    counters = Counters()
    engine = open_engine(config, counters, SharedState())
    request_r, request_w = os.pipe()
    side, side_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    lifeline_r, _lifeline_w = os.pipe()
    state = SharedState()
    loop = _writer.WriterLoop(
        _writer.LoopArgs(
            engine, counters, config, Connection(request_r), side, Connection(lifeline_r), state
        )
    )
    bulk_sender = _wire.make_sender_token(os.getpid())
    caller = _wire.make_sender_token(os.getpid())
    awaited_id, caller_slot = 7, 1
    now = time.monotonic()
    insert = pickle.dumps((now + 60, now, ("INSERT INTO t VALUES (1)", ())))
    # One chunk: a bulk frame whose payload a dead writer took, then the
    # caller's request -- which the dead writer never read.
    os.write(
        request_w,
        _wire.encode_frame(
            _wire.Kind.EXECUTE, _wire.WHOLE | _wire.HANDED_OVER, bulk_sender, 3, 5, b""
        )
        + _wire.encode_frame(
            _wire.Kind.EXECUTE, _wire.WHOLE, caller, awaited_id, caller_slot, insert
        ),
    )
    # The caller saw EOF and re-registered its slot, awaiting that request:
    # the writer reads this while looking for the bulk payload, mid-chunk.
    reply_r, reply_w = os.pipe()
    registration = _wire.PIPE_REGISTRATION.pack(_wire.PIPE_TAG, caller, caller_slot, awaited_id)
    socket.send_fds(side_peer, [registration], [reply_w])
    os.close(reply_w)
    loop._inbox.read_available()
    loop._serve_batch()
    os.set_blocking(reply_r, False)
    data = os.read(reply_r, 1 << 16)
    replies = 0
    while data:
        data = data[_wire.REPLY_HEADER_SIZE + _wire.decode_reply_header(data)[0] :]
        replies += 1
    with closing(sqlite3.connect(config.path)) as reader:
        rows = int(reader.execute("SELECT count(*) FROM t").fetchone()[0])
    return replies, rows


def test_a_re_registration_read_mid_chunk_gets_one_reply(tmp_path: Path) -> None:
    """A request must not be reported lost while it sits, read but not yet
    parsed, later in the chunk of frames being handled -- it would be served
    as well, and answered twice. Run in a child: the loop installs signal
    handlers."""
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            replies, rows = count_replies_after_a_mid_chunk_reregistration(str(tmp_path))
            os.write(result_w, f"{replies} {rows}".encode())
        finally:
            os._exit(0)
    os.close(result_w)
    assert select.select([result_r], [], [], 20.0)[0], "the child did not report"
    outcome = os.read(result_r, 100).decode()
    os.close(result_r)
    reap_pid(pid)
    assert outcome == "1 1", "expected one reply and one row, got (replies, rows) = " + outcome


def streamed_file(client: int, count: int) -> tuple[int, int]:
    """A request file as a caller streams it: (descriptor, length)."""
    fd = os.memfd_create("mpwriter-test", os.MFD_CLOEXEC)
    now = time.monotonic()
    rows = iter(bulk_rows(client, count))
    written = _calls.write_rows(fd, [list(itertools.islice(rows, 1_000))], rows)
    head = pickle.dumps((now + 60, now, (INSERT, None)))
    return fd, _calls.finish_rows(fd, written, head)


def test_streamed_files_in_use_count_against_the_bound_of_held_hand_overs() -> None:
    """Taken streamed files cannot be dropped (their requests are queued), so
    they count: past the bound, the oldest files still waiting are dropped,
    never the newest; released ones stop counting."""
    sender = _wire.make_sender_token(os.getpid())
    probe, one_file = streamed_file(1, 10_000)
    os.close(probe)
    with writer_inbox(handed_over_bytes_max=int(2.5 * one_file)) as (inbox, _, peer):
        held = inbox.handovers

        def hand_over(request_id: int) -> None:
            fd, length = streamed_file(request_id, 10_000)
            message = _wire.PAYLOAD_HANDOVER.pack(_wire.PAYLOAD_TAG, sender, request_id, length)
            socket.send_fds(peer, [message], [fd])
            os.close(fd)
            inbox.read_side_socket()

        hand_over(1)
        in_use = held.take_streamed((sender, 1))
        assert in_use is not None
        assert list(in_use) == list(in_use) == bulk_rows(1, 10_000)  # read again, whole
        hand_over(2)
        hand_over(3)  # 3 files > 2.5: file 2 goes, not the newest, not the one in use
        assert held.dropped == 1
        assert held.take_streamed((sender, 2)) is None
        newest = held.take_streamed((sender, 3))
        assert newest is not None
        assert sum(1 for _ in newest) == 10_000
        held.release_streamed(in_use)
        held.release_streamed(newest)
        hand_over(4)
        hand_over(5)  # two files: within the bound once the others were released
        assert held.dropped == 1
