"""Fault injection: SIGKILL of the writer, of clients, of the owner; lock contention.

Each test injects one fault and asserts the exact outcome: which exception,
with which message, how soon, and what the database holds afterwards. Nothing
here synchronises by sleeping: children say where they are through pipes, the
writer is held still by a `Gate` (a `call()` blocked on a FIFO), deaths are
seen on process sentinels and pidfds, and every wait has a deadline.

Children are forked; the handle reaches them through ``Process`` args.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import multiprocessing
import os
import pickle
import re
import select
import signal
import sqlite3
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import pytest

import kill_clients
import mpwriter
from _faults import INSERT, reap
from conftest import AT_ONCE, SCHEDULING_SLIP, SCHEMA, Gate, count_rows
from mpwriter import testing

DEADLINE = 10.0  # the most any single wait in this file may take before the test fails
OUTCOME_UNKNOWN = re.compile(r"outcome (is )?unknown")
_FORK = multiprocessing.get_context("fork")


# -- children ------------------------------------------------------------------


@dataclass
class Child:
    process: Any
    control: Connection  # test -> child
    report: Connection  # child -> test


class Children:
    """Forked children with a control pipe and a report pipe each; all reaped at the end."""

    def __init__(self) -> None:
        self.started: list[Child] = []

    def start(self, target: Callable[..., None], *args: Any, daemon: bool = True) -> Child:
        """Fork ``target(*args, control, report)``; a daemon unless it must have children."""
        control_r, control_w = _FORK.Pipe(duplex=False)
        report_r, report_w = _FORK.Pipe(duplex=False)
        process = _FORK.Process(target=target, args=(*args, control_r, report_w), daemon=daemon)
        process.start()
        control_r.close()
        report_w.close()  # the child holds the only write end: EOF means it is gone
        child = Child(process, control_w, report_r)
        self.started.append(child)
        return child

    def reap_all(self) -> None:
        for child in self.started:
            child.control.close()  # EOF: a child still waiting for orders returns
        for child in self.started:
            reap(child.process)
            child.report.close()


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.reap_all()


def receive(conn: Connection, timeout: float = DEADLINE) -> Any:
    """The next report from a child, within ``timeout`` seconds."""
    if not conn.poll(timeout):
        raise AssertionError(f"no report from the child within {timeout} s")
    try:
        return conn.recv()
    except EOFError:
        raise AssertionError("the child exited without reporting") from None


def report_outcome(report: Connection, action: Callable[..., Any], *args: Any) -> None:
    """Run ``action(*args)``; send ("ok", value, t) or ("raised", exc, t), t = when it ended."""
    try:
        value = action(*args)
    except BaseException as exc:
        ended = time.monotonic()  # system-wide on Linux: comparable with the parent's clock
        try:
            report.send(("raised", exc, ended))
        except (pickle.PicklingError, TypeError, AttributeError):
            report.send(("raised", RuntimeError(f"{type(exc).__name__}: {exc}"), ended))
    else:
        report.send(("ok", value, time.monotonic()))


def await_go(control: Connection) -> bool:
    """Wait for the test's go-ahead; False if the test closed the pipe or gave up."""
    if not control.poll(DEADLINE):
        return False
    try:
        control.recv()
    except EOFError:
        return False
    return True


# Child bodies: module-level, so that they would be importable under spawn too.


def insert_when_told(
    writer: mpwriter.Writer, client: int, control: Connection, report: Connection
) -> None:
    """Submit one insert on "go", report "sent", then report how it ended.

    `submit` returns once the request is written to the queue, which `execute`
    cannot tell; the wait afterwards is on the same kind of reply pipe.
    """
    if not await_go(control):
        return
    future = writer.submit(INSERT, (client, 0), timeout=30.0)
    report.send(("sent", None, time.monotonic()))
    report_outcome(report, future.result, 30.0)


def insert_now(
    writer: mpwriter.Writer, client: int, control: Connection, report: Connection
) -> None:
    report_outcome(report, writer.execute, INSERT, (client, 0))


def send_large_request(
    writer: mpwriter.Writer, client: int, size: int, control: Connection, report: Connection
) -> None:
    """On "go", say "calling", then execute one insert of a ``size``-byte blob.

    As frames: the path of systems without memfd, where a payload this large
    is not handed over as a file (test_handover.py covers that path).
    """
    testing.faults.hand_over = False  # this child's own process: nothing else sees it
    blob = bytes(size)
    if not await_go(control):
        return
    report.send(("calling", None, time.monotonic()))
    sql = "INSERT INTO items(client, seq, payload) VALUES (?, 0, ?)"
    report_outcome(report, writer.execute, sql, (client, blob))


def own_a_writer(db_path: str, context: str, control: Connection, report: Connection) -> None:
    """Be the owner: start a writer, write a row, send the writer's pid, wait to be killed."""
    writer = mpwriter.start(db_path, init=SCHEMA, timeout=10.0, context=context)
    writer.execute(INSERT, (0, 0))  # leaves frames in the WAL for the writer to checkpoint
    report.send(writer.stats()["pid"])
    control.poll(60.0)  # killed long before; bounded all the same


def hold_write_lock(db_path: str, control: Connection, report: Connection) -> None:
    """Not mpwriter: a plain connection that takes the write lock until told to let go."""
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        report.send("holding")
        await_go(control)
        db.execute("ROLLBACK")
    finally:
        db.close()
    report.send("released")


def schema_and_announce_begins(announce_fd: int, conn: sqlite3.Connection) -> None:
    """A writer ``init``: the schema, then one byte on ``announce_fd`` per BEGIN IMMEDIATE.

    The trace callback runs as the statement starts, so each byte is one
    attempt to take the write lock -- what the test needs to know that a
    request is waiting on an outside lock holder.
    """
    conn.executescript(SCHEMA)

    def trace(statement: str) -> None:
        if statement.startswith("BEGIN IMMEDIATE"):
            with contextlib.suppress(BlockingIOError):  # never stall the writer
                os.write(announce_fd, b"B")

    conn.set_trace_callback(trace)


# -- helpers -----------------------------------------------------------------------


def queued_bytes(writer: mpwriter.Writer) -> int:
    """Bytes waiting in the request pipe, read on the owner's end (FIONREAD).

    stats() reports the same figure, but a held writer cannot answer it.
    """
    answer = fcntl.ioctl(writer._link.request_fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", answer)[0])


def rows_of(db_path: Path, where: str = "1") -> list[tuple[Any, ...]]:
    with closing(mpwriter.reader(db_path)) as conn:
        return conn.execute(f"SELECT client, seq FROM items WHERE {where} ORDER BY id").fetchall()


# -- tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("restart", [False, True], ids=["no-restart", "restart"])
def test_writer_sigkill_fails_waiting_callers_fast(
    db_path: Path, gate: Gate, children: Children, restart: bool, context: str
) -> None:
    """Callers waiting on a killed writer learn it at once (`AT_ONCE`).

    The gate's request was taken by the writer that died: its outcome is
    unknown either way. The callers' requests were still queued: without
    restarts they fail too (outcome unknown: the caller cannot tell they were
    never read); with a restart the successor serves them. Every call here
    has a timeout of 5 s or more, and none ends in Timeout: none waited it out.
    """
    writer = mpwriter.start(db_path, init=SCHEMA, timeout=10.0, context=context, restart=restart)
    try:
        writer_pid = writer.stats()["pid"]
        callers = [children.start(insert_when_told, writer, client) for client in range(4)]
        gate.hold(writer)
        for caller in callers:
            caller.control.send("go")
        for caller in callers:
            assert receive(caller.report)[0] == "sent"

        killed_at = time.monotonic()
        os.kill(writer_pid, signal.SIGKILL)

        gate_error = gate.future.exception(timeout=5.0)  # its call's own timeout is 10 s
        assert time.monotonic() - killed_at < AT_ONCE + SCHEDULING_SLIP
        assert isinstance(gate_error, mpwriter.WriterCrashed), repr(gate_error)
        assert OUTCOME_UNKNOWN.search(str(gate_error)), str(gate_error)
        for caller in callers:
            status, value, ended = receive(caller.report, 5.0)
            took = ended - killed_at  # the callers' timeout is 30 s
            assert took < AT_ONCE + SCHEDULING_SLIP, f"answered {took:.2f} s after the kill"
            if restart:
                assert status == "ok", repr(value)
                assert value.rowcount == 1
            else:
                assert status == "raised", value
                assert isinstance(value, mpwriter.WriterCrashed), repr(value)
                assert OUTCOME_UNKNOWN.search(str(value)), str(value)

        began = time.monotonic()
        if restart:
            stats = writer.stats()
            assert (stats["restarts"], stats["lost_requests"]) == (1, 1)
            assert stats["pid"] != writer_pid
        else:
            # A new call is refused at once, and says it was not sent.
            with pytest.raises(mpwriter.WriterCrashed, match="not sent") as refused:
                writer.execute(INSERT, (9, 0), timeout=5.0)
            # "died", or "was killed by signal 9" once the owner has reaped it;
            # never a claim that someone else took the exit status.
            assert "reaped elsewhere" not in str(refused.value)
        assert time.monotonic() - began < AT_ONCE + SCHEDULING_SLIP
    finally:
        began = time.monotonic()
        writer.close(timeout=5.0)
    assert time.monotonic() - began < AT_ONCE + SCHEDULING_SLIP  # not by its 5 s timeout
    assert writer.closed
    assert count_rows(db_path) == (4 if restart else 0)


def test_random_client_sigkills_lose_no_acknowledged_row(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    report = kill_clients.run_client_kills(writer, kills=100)
    seed = f"(seed {report.seed})"
    assert report.kills == 100
    assert report.errors == [], seed
    assert report.no_progress == [], f"survivors stuck {seed}"
    assert report.bad_exits == {}, seed
    assert report.acknowledged_writes > 0

    result = kill_clients.audit(db_path, report.acked)
    assert result.integrity == "ok"
    assert result.lost == [], f"acknowledged rows lost {seed}"
    assert result.unexpected == [], seed

    stats = writer.stats(timeout=5.0)
    # No client's death may surface as an error, "database is locked" least of all.
    assert "OperationalError" not in stats["errors_by_class"], stats["errors_by_class"]
    assert stats["errors"] == 0, stats["errors_by_class"]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_owner_death_stops_writer(db_path: Path, children: Children, context: str) -> None:
    # The owner starts the writer, so it must not be a daemon.
    owner = children.start(own_a_writer, str(db_path), context, daemon=False)
    writer_pid = receive(owner.report)
    pidfd = os.pidfd_open(writer_pid)  # the writer is alive: its owner is waiting
    try:
        os.kill(owner.process.pid, signal.SIGKILL)
        exited = select.select([pidfd], [], [], DEADLINE)[0]
        if not exited:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # not ours to reap: just stop it
        assert exited, "the writer outlived its owner"
    finally:
        os.close(pidfd)
        # Only now: the writer inherited the owner's end of the owner's sentinel
        # pipe under fork, so that sentinel fires when both are gone.
        reap(owner.process)

    # It shut down rather than died: the WAL was checkpointed away.
    wal = Path(f"{db_path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    with mpwriter.start(db_path, timeout=10.0, context="fork") as successor:
        assert successor.execute("SELECT client, seq FROM items").rows == [(0, 0)]


def test_second_writer_on_same_file_is_refused(writer: mpwriter.Writer, db_path: Path) -> None:
    with pytest.raises(mpwriter.WriterAlreadyRunning, match="already serves"):
        mpwriter.start(db_path, timeout=10.0, context="fork")
    assert writer.execute(INSERT, (1, 0)).rowcount == 1  # the first one keeps serving

    writer.close()
    with mpwriter.start(db_path, timeout=10.0, context="fork") as successor:
        assert successor.execute(INSERT, (1, 1)).rowcount == 1
    assert rows_of(db_path) == [(1, 0), (1, 1)]


def test_outside_lock_holder(db_path: Path, children: Children) -> None:
    announce_r, announce_w = os.pipe()
    os.set_blocking(announce_r, False)
    os.set_blocking(announce_w, False)
    init = functools.partial(schema_and_announce_begins, announce_w)
    try:
        writer = mpwriter.start(db_path, init=init, timeout=10.0, context="fork")
    finally:
        os.close(announce_w)  # the writer holds the only copy now
    holder = children.start(hold_write_lock, str(db_path))
    try:
        assert receive(holder.report) == "holding"

        began = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            writer.execute(INSERT, (1, 0), timeout=0.3)
        assert time.monotonic() - began < 0.3 + SCHEDULING_SLIP  # by its timeout
        retries = writer.stats()["retries"]
        assert retries > 0
        with contextlib.suppress(BlockingIOError):
            os.read(announce_r, 4096)  # the short request's attempts, all made before its reply

        outcome: list[Any] = []

        def patient() -> None:
            try:
                outcome.append(writer.execute(INSERT, (1, 1), timeout=10.0))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=patient, daemon=True)
        thread.start()
        # Two attempts while the lock is still held: the first was refused, so
        # this request is waiting on the holder and a retry was counted.
        attempts = b""
        while len(attempts) < 2:
            assert select.select([announce_r], [], [], DEADLINE)[0], "the writer made no attempt"
            attempts += os.read(announce_r, 2 - len(attempts))
        holder.control.send("release")
        assert receive(holder.report) == "released"
        thread.join(DEADLINE)
        assert not thread.is_alive()

        assert len(outcome) == 1
        assert isinstance(outcome[0], mpwriter.Result), repr(outcome[0])
        assert outcome[0].rowcount == 1
        assert writer.stats()["retries"] > retries
        assert rows_of(db_path) == [(1, 1)]
    finally:
        writer.close()
        os.close(announce_r)


def test_large_request_from_killed_client_does_not_wedge(
    writer: mpwriter.Writer, db_path: Path, tmp_path: Path, children: Children
) -> None:
    # 5 MB cannot fit in the request pipe (at most 1 MiB): with the writer held,
    # the sender blocks part-way and dies with some of its frames queued.
    size = 5 << 20
    partial = 0
    # Kill points spread over pickling and sending; longer waits only if no
    # kill has landed part-way yet (a loaded machine).
    for cycle, kill_after in enumerate((0.0, 0.01, 0.05, 0.2, 1.0)):
        if cycle >= 3 and partial:
            break
        client = 1000 + cycle
        sender = children.start(send_large_request, writer, client, size)
        directory = tmp_path / f"gate{cycle}"
        directory.mkdir()
        gate = Gate(directory)
        try:
            gate.hold(writer)
            before = queued_bytes(writer)
            sender.control.send("go")
            assert receive(sender.report)[0] == "calling"
            # The sender must not finish meanwhile: it cannot, the writer is held.
            assert not wait([sender.process.sentinel], kill_after), receive(sender.report)
            sender.process.kill()  # SIGKILL
            reap(sender.process)  # dead for the writer's sweep, not a zombie
            assert sender.process.exitcode == -signal.SIGKILL
            queued = queued_bytes(writer) - before
            # Frames are written whole even by a process killed while writing.
            assert queued % select.PIPE_BUF == 0, queued
            partial += queued > 0
        finally:
            gate.release()
        assert gate.future.result(timeout=DEADLINE) == "released"
        gate.close()

        other = children.start(insert_now, writer, 2000 + cycle)
        status, value, _ = receive(other.report)
        assert status == "ok", repr(value)
        assert value.rowcount == 1

    assert partial > 0, "no sender was killed part-way: nothing was tested"
    # The writer forgets the pieces of dead senders about once a second.
    deadline = time.monotonic() + 5.0
    while True:
        stats = writer.stats()
        if stats["dropped_partial_requests"] >= partial or time.monotonic() > deadline:
            break
    assert stats["dropped_partial_requests"] == partial
    assert stats["resync_skipped_bytes"] == 0
    assert writer.execute(INSERT, (3000, 0)).rowcount == 1
    assert rows_of(db_path, "client >= 1000 AND client < 2000") == []
    assert count_rows(db_path) == 4


def test_writer_exits_cleanly_on_sigterm(
    writer: mpwriter.Writer, db_path: Path, gate: Gate, children: Children
) -> None:
    writer_pid = writer.stats()["pid"]
    pidfd = os.pidfd_open(writer_pid)  # to see it exit (its supervisor reaps it)
    callers = [children.start(insert_when_told, writer, client) for client in range(3)]
    gate.hold(writer)
    for caller in callers:
        caller.control.send("go")
    for caller in callers:
        assert receive(caller.report)[0] == "sent"

    os.kill(writer_pid, signal.SIGTERM)
    gate.release()

    # Everything queued before the signal is served and committed.
    assert gate.future.result(timeout=DEADLINE) == "released"
    for caller in callers:
        status, value, _ = receive(caller.report)
        assert status == "ok", repr(value)
        assert value.rowcount == 1
    exited = select.select([pidfd], [], [], DEADLINE)[0]
    os.close(pidfd)
    assert exited, "the writer did not exit on SIGTERM"
    # Its supervisor reaps it, records its exit status, and exits too.
    supervisor = writer._owner.supervisor  # type: ignore[union-attr]
    supervisor.join(DEADLINE)
    assert supervisor.exitcode == 0
    assert testing.shared_state(writer).last_exit == 0
    wal = Path(f"{db_path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed on the way out

    with pytest.raises(mpwriter.WriterClosed, match="closed"):
        writer.execute(INSERT, (9, 0))
    assert writer.closed
    assert sorted(rows_of(db_path)) == [(0, 0), (1, 0), (2, 0)]
    with mpwriter.start(db_path, timeout=10.0, context="fork") as successor:  # lock released
        assert successor.execute(INSERT, (3, 0)).rowcount == 1
