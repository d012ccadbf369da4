"""Restarts, the watchdog, execution limits, backpressure and a full disk."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import select
import signal
import sqlite3
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

import mpwriter
from _faults import reap
from conftest import SCHEMA, Gate, count_rows, hold_writer, sigkill_and_wait
from mpwriter import testing
from mpwriter._caller import blocking, calls
from mpwriter._wire import frames as _wire


def test_queued_requests_survive_a_writer_kill_and_the_taken_one_is_reported_lost(
    db_path: Path, gate: Gate
) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork", timeout=20) as writer:
        first_pid = writer.stats()["pid"]
        gate.hold(writer)  # the writer has taken the gate's request, and nothing else
        queued = [
            writer.submit("INSERT INTO items(client, seq) VALUES (1, ?)", (n,)) for n in range(20)
        ]
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(mpwriter.WriterCrashed, match="outcome is unknown"):
            gate.future.result(timeout=20)
        assert [f.result(timeout=20).rowcount for f in queued] == [1] * 20
        stats = writer.stats()
        assert stats["restarts"] == 1
        assert stats["pid"] != first_pid
        assert stats["lost_requests"] == 1
    assert count_rows(db_path) == 20


def test_a_frame_inside_a_torn_payload_is_not_taken_for_a_request(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    """What a successor finds after its predecessor died part-way through a
    read, when the payload it lands in holds the bytes of a whole frame (a
    caller's blob may): the stream's key tells that frame from a real one."""
    now = time.monotonic()
    insert = pickle.dumps((now + 60, now, ("INSERT INTO items(client, seq) VALUES (99, 99)", ())))
    hidden = _wire.encode_frame(_wire.Kind.EXECUTE, _wire.WHOLE, 1, 1, _wire.NO_REPLY, insert)
    carrier = next(_wire.encode_frames(_wire.Kind.EXECUTE, 1, 2, 1, b"x" * 64 + hidden))
    torn = carrier[40:]  # its head is gone; the hidden frame is whole
    os.write(writer._link.request_fd, torn)
    assert writer.execute("INSERT INTO items(client, seq) VALUES (1, 1)").rowcount == 1
    assert writer.stats()["resync_skipped_bytes"] == len(torn)
    assert count_rows(db_path) == 1


def test_torn_bytes_in_the_queue_are_skipped_and_the_next_request_served(
    writer: mpwriter.Writer,
) -> None:
    from mpwriter._wire import frames as _wire

    # What a successor finds when its predecessor died part-way through a read:
    # the tail of a frame whose head is gone.
    whole = next(_wire.encode_frames(_wire.Kind.EXECUTE, 1, 1, 1, os.urandom(3000)))
    torn = whole[100:]
    os.write(writer._link.request_fd, torn)
    result = writer.execute(
        "INSERT INTO items(payload) VALUES ('after the tear') RETURNING payload"
    )
    assert result.rows == [("after the tear",)]
    assert writer.stats()["resync_skipped_bytes"] == len(torn)


def test_past_the_restart_cap_callers_fail_at_once_and_the_service_comes_back(
    db_path: Path,
) -> None:
    """max_restarts counts writers that die young in a row (here: killed before
    serving a batch); past it calls fail at once, and a writer that starts and
    serves brings the service back without a restart of the app."""
    with mpwriter.start(
        db_path, init=SCHEMA, context="fork", max_restarts=1, restart_backoff_max=0.3
    ) as writer:
        os.kill(writer.stats()["pid"], signal.SIGKILL)  # stats() is no batch: died young
        os.kill(writer.stats()["pid"], signal.SIGKILL)  # young again: past the cap
        began = time.monotonic()
        with pytest.raises(mpwriter.WriterCrashed, match="killed by signal 9; backing off"):
            insert_until_refused(writer)
        assert time.monotonic() - began < 5
        insert_until_served(writer)
        assert writer.stats()["restarts"] == 2
    assert count_rows(db_path) >= 1  # a refused call may have been queued: outcome unknown


def insert_until_refused(writer: mpwriter.Writer) -> None:
    """Insert until a call fails: each try is a real call, racing the supervisor."""
    for _ in range(50):
        writer.execute("INSERT INTO items(payload) VALUES ('refused')", timeout=5)


def insert_until_served(writer: mpwriter.Writer) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            writer.execute("INSERT INTO items(payload) VALUES ('served')", timeout=5)
            return
        except mpwriter.WriterCrashed:
            assert time.monotonic() < deadline, "no writer came back"
            time.sleep(0.01)  # sleep-ok: an app's retry pace; each try is a real call


def block_alarms_and_hang(conn: sqlite3.Connection, seconds: float) -> None:
    """A `call()` target stuck where no interrupt reaches it: every signal blocked,
    so the writer's limiter cannot break the system call."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    conn.execute("INSERT INTO items(payload) VALUES ('never committed')")
    select.select([], [], [], seconds)


def test_watchdog_kills_and_replaces_a_stuck_writer(db_path: Path) -> None:
    with mpwriter.start(
        db_path, init=SCHEMA, context="fork", watchdog_grace=0.3, timeout=10
    ) as writer:
        stuck_pid = writer.stats()["pid"]
        with pytest.raises((mpwriter.Timeout, mpwriter.WriterCrashed)):
            writer.call_with_timeout(0.3, block_alarms_and_hang, 30.0)
        assert writer.execute("INSERT INTO items(payload) VALUES ('next')").rowcount == 1
        stats = writer.stats()
        assert stats["restarts"] == 1
        assert stats["pid"] != stuck_pid
    assert count_rows(db_path) == 1


INFINITE_QUERY = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
)


def test_long_sql_is_interrupted_at_the_execution_limit(db_path: Path) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork", execution_limit=0.2) as writer:
        began = time.monotonic()
        with pytest.raises(mpwriter.Interrupted, match="rolled back"):
            writer.execute(INFINITE_QUERY)
        assert time.monotonic() - began < 5
        assert writer.execute("INSERT INTO items(payload) VALUES ('ok')").rowcount == 1
        assert writer.stats()["restarts"] == 0


def spin_after_writing(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO items(payload) VALUES ('rolled back')")
    while True:
        pass


def test_a_spinning_call_is_interrupted_and_rolled_back(db_path: Path) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork", execution_limit=0.2) as writer:
        with pytest.raises(mpwriter.Interrupted):
            writer.call(spin_after_writing)
        assert writer.execute("INSERT INTO items(payload) VALUES ('ok')").rowcount == 1
        assert writer.stats()["restarts"] == 0
    assert count_rows(db_path) == 1


def submit_until_full(writer: mpwriter.Writer, accepted: list[Future[mpwriter.Result]]) -> None:
    for n in range(10_000):
        accepted.append(
            writer.submit(
                "INSERT INTO items(seq, payload) VALUES (?, ?)", (n, "x" * 200), timeout=0.2
            )
        )


def test_a_full_queue_raises_queue_full_and_loses_nothing_accepted(
    db_path: Path, gate: Gate
) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork", queue_size=4096) as writer:
        gate.hold(writer)
        accepted: list[Future[mpwriter.Result]] = []
        with pytest.raises(mpwriter.QueueFull):
            submit_until_full(writer, accepted)
        assert 0 < len(accepted) < 10_000
        gate.release()
        assert gate.future.result(timeout=10) == "released"
        # The accepted ones were queued before their deadline but waited behind
        # the gate: each either committed or was dropped unapplied as expired.
        outcomes = {"ok": 0, "expired": 0}
        for future in accepted:
            try:
                future.result(timeout=10)
                outcomes["ok"] += 1
            except mpwriter.Timeout:
                outcomes["expired"] += 1
        assert count_rows(db_path) == outcomes["ok"]


def test_a_full_disk_fails_that_batch_and_the_writer_recovers(writer: mpwriter.Writer) -> None:
    writer.execute("INSERT INTO items(payload) VALUES ('before')")
    pages = writer.call(current_page_count)
    writer.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        writer.executemany("INSERT INTO items(payload) VALUES (?)", [("z" * 4000,)] * 50)
    writer.execute("PRAGMA max_page_count = 1000000")
    assert writer.execute("INSERT INTO items(payload) VALUES ('after')").rowcount == 1
    assert writer.call(count_items) == 2


def current_page_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA page_count").fetchone()[0])


def count_items(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])


def test_close_serves_everything_already_queued(db_path: Path, gate: Gate) -> None:
    writer = mpwriter.start(db_path, init=SCHEMA, context="fork")
    gate.hold(writer)
    queued = [writer.submit("INSERT INTO items(seq) VALUES (?)", (n,)) for n in range(30)]
    closer = threading.Thread(target=writer.close, kwargs={"timeout": 20})
    closer.start()
    gate.release()
    closer.join(30)
    assert not closer.is_alive()
    assert [f.result(timeout=10).rowcount for f in queued] == [1] * 30
    assert count_rows(db_path) == 30
    with pytest.raises(mpwriter.WriterClosed):
        writer.execute("INSERT INTO items(seq) VALUES (99)")


@pytest.mark.parametrize("timeout", [0.5, 3.0])
def test_close_ends_within_its_timeout_when_the_writer_is_stuck(
    db_path: Path, gate: Gate, timeout: float
) -> None:
    writer = mpwriter.start(db_path, init=SCHEMA, context="fork", timeout=30)
    stuck_pid = writer.stats()["pid"]
    gate.hold(writer)  # a call() that returns only when released: SIGTERM does not end it
    pidfd = os.pidfd_open(stuck_pid)
    try:
        began = time.monotonic()
        writer.close(timeout=timeout)
        took = time.monotonic() - began
        # A behavioural bound: the timeout, plus a margin for a loaded machine,
        # well below the 2 s a SIGTERM'd writer was once granted on top of it.
        assert took <= timeout + 0.5, f"close({timeout}) took {took:.2f} s"
        assert select.select([pidfd], [], [], 0)[0], "the stuck writer outlived close()"
    finally:
        os.close(pidfd)
        gate.release()
    with pytest.raises(mpwriter.WriterUnavailable):
        gate.future.result(timeout=10)
    # The lock went with it: a new writer starts at once.
    with mpwriter.start(db_path, context="fork") as successor:
        assert successor.execute("INSERT INTO items(seq) VALUES (1)").rowcount == 1


def die_once_during_start(conn: sqlite3.Connection) -> None:
    """An `init` that kills the first writer started after a marker file appears."""
    conn.execute("CREATE TABLE IF NOT EXISTS t(x)")
    marker = conn.execute("PRAGMA database_list").fetchone()[2] + ".die-once"
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_writer_dying_while_it_restarts_is_restarted_again(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with mpwriter.start(path, init=die_once_during_start, context="fork", timeout=10) as writer:
        writer.execute("INSERT INTO t VALUES (1)")
        (tmp_path / "app.db.die-once").touch()
        first = writer.stats()["pid"]
        sigkill_and_wait(first)
        # The first successor dies in its start-up; the second one serves.
        assert writer.execute("INSERT INTO t VALUES (2)").rowcount == 1
        assert writer.stats()["restarts"] == 2
    assert count_rows(path, "t") == 2


def insert_and_hold(conn: sqlite3.Connection, entered_path: str, release_path: str) -> str:
    conn.execute("INSERT INTO items(payload) VALUES ('held call committed')")
    return str(hold_writer(conn, entered_path, release_path))


def ask_for_stats(writer: mpwriter.Writer) -> None:
    writer.stats()


def test_a_request_served_by_the_successor_is_never_reported_lost(
    db_path: Path, tmp_path: Path
) -> None:
    """The caller's pooled pipe belonged to a dead writer; its next call is
    taken by the successor *before* the caller re-registers its pipe."""
    gate = Gate(tmp_path)
    with mpwriter.start(db_path, init=SCHEMA, context="fork", timeout=10) as writer:
        writer.execute("INSERT INTO items(payload) VALUES ('first')")  # pipe of writer 1
        first = writer.stats()["pid"]
        sigkill_and_wait(first)
        probe = multiprocessing.get_context("fork").Process(target=ask_for_stats, args=(writer,))
        probe.start()  # fresh pipes: returns once the successor serves
        reap(probe)
        assert probe.exitcode == 0

        # Force the interleaving: re-register only once the successor runs the call.
        running = threading.Event()

        def watch() -> None:
            select.select([gate._entered], [], [], 10)
            os.read(gate._entered, 1)
            running.set()

        threading.Thread(target=watch, daemon=True).start()
        with testing.inject(
            before_reregister=lambda: running.wait(10), after_reregister=gate.release
        ):
            result = writer.call(insert_and_hold, gate._entered_path, gate._release_path)
        assert result == "released"
        assert writer.stats()["lost_requests"] == 0
    gate.close()
    assert count_rows(db_path) == 2


def test_the_writer_ignores_sigint_and_sighup(writer: mpwriter.Writer) -> None:
    # Ctrl-C and a closed terminal reach the whole process group: the owner decides.
    pid = writer.stats()["pid"]
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGHUP)
    assert writer.execute("INSERT INTO items(payload) VALUES ('still here')").rowcount == 1
    stats = writer.stats()
    assert (stats["pid"], stats["restarts"]) == (pid, 0)


def test_a_send_that_races_close_fails_cleanly_and_writes_nowhere(
    writer: mpwriter.Writer, tmp_path: Path
) -> None:
    """A thread that passed the "closed?" check just before another thread
    closed the handle still sends. Its frame must not land in whatever file
    the process opened since, under the descriptor number the queue had."""
    writer.close()
    # What a send that passed the check goes on to do: frame and write.
    pool, request_fd = writer._link.pool, writer._link.request_fd
    sender, request_id = pool.local.sender, pool.next_request_id()
    kind, key = _wire.Kind.EXECUTE, pool.frame_key
    frame = _wire.encode_frame(kind, _wire.WHOLE, sender, request_id, 0, b"a late request", key)
    unrelated = tmp_path / "unrelated.bin"
    fd = os.open(unrelated, os.O_CREAT | os.O_WRONLY)
    try:
        with pytest.raises(mpwriter.WriterClosed):
            blocking.run(calls.write_frames(pool, request_fd, (frame,), time.monotonic() + 1.0))
    finally:
        os.close(fd)
    assert unrelated.stat().st_size == 0
