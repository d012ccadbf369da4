"""The supervisor process and the restart policy.

- A writer that had served is replaced at once, however often it dies.
- Writers that die young (start-up, or before their first batch) back off;
  past ``max_restarts`` of them in a row calls fail fast with `WriterCrashed`,
  and the service comes back by itself once a writer serves again.
- The owner keeps no thread: neither its own forks nor a writer restart is a
  fork of a multi-threaded process (Python 3.12+ warns about those; the test
  runs a child interpreter so that the warning can be seen at all).
- A SIGKILLed owner leaves neither supervisor nor writer behind.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

import mpwriter
from _faults import reap
from conftest import AT_ONCE, SCHEDULING_SLIP, SCHEMA, count_rows, sigkill_and_wait
from mpwriter._owner.supervisor import Backoff, RestartPolicy

DEADLINE = 10.0  # the most any single wait in this file may take before the test fails


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read()
    return int(fields[fields.rindex(b")") + 2 :].split()[1])


def call_until_served(writer: mpwriter.Writer, sql: str, deadline: float) -> int:
    """Retry ``sql`` as an app would while calls fail fast; return the failures seen."""
    failures = 0
    while True:
        try:
            writer.execute(sql, timeout=DEADLINE)
            return failures
        except mpwriter.WriterCrashed:
            failures += 1
            assert time.monotonic() < deadline, "no writer served again"
            time.sleep(0.01)  # sleep-ok: an app's retry pace; each try is a real call


# -- the policy's arithmetic -----------------------------------------------------------


def test_backoff_grows_only_for_young_deaths_and_resets_after_a_healthy_run() -> None:
    backoff = Backoff(RestartPolicy(max_restarts=3, backoff_max=0.5))
    assert backoff.writer_died(served=True, uptime=0.01) == (0.0, False)
    young = [backoff.writer_died(served=False, uptime=0.01) for _ in range(6)]
    assert young == [
        (0.05, False),
        (0.1, False),
        (0.2, False),
        (0.4, True),  # the 4th young death in a row is past max_restarts=3
        (0.5, True),  # capped
        (0.5, True),
    ]
    assert backoff.writer_died(served=True, uptime=0.01) == (0.0, False)
    assert backoff.writer_died(served=False, uptime=0.01) == (0.05, False)  # reset
    # An idle writer that stayed up long enough counts as healthy too.
    assert backoff.writer_died(served=False, uptime=3600.0) == (0.0, False)
    assert backoff.writer_died(served=False, uptime=0.01) == (0.05, False)


# -- replacement of a serving writer --------------------------------------------------------


def test_a_writer_that_served_is_replaced_at_once_every_time(db_path: Path) -> None:
    kills = 8  # more than max_restarts: no cap applies to writers that served
    with mpwriter.start(db_path, init=SCHEMA, context="fork", timeout=DEADLINE) as writer:
        for n in range(kills):
            victim = writer.stats()["pid"]
            pending = [
                writer.submit("INSERT INTO items(client, seq) VALUES (1, ?)", (n * 100 + k,))
                for k in range(20)
            ]
            writer.execute("INSERT INTO items(client, seq) VALUES (0, ?)", (n,))  # it served
            sigkill_and_wait(victim)
            began = time.monotonic()
            writer.execute("INSERT INTO items(client, seq) VALUES (2, ?)", (n,))
            resumed = time.monotonic() - began  # its timeout: DEADLINE, 10 s
            assert resumed < AT_ONCE + SCHEDULING_SLIP, (
                f"kill {n}: the next call took {resumed:.2f} s"
            )
            for future in pending:
                # WriterCrashed: taken by the killed writer, outcome unknown.
                with contextlib.suppress(mpwriter.WriterCrashed):
                    future.result(timeout=DEADLINE)
        stats = writer.stats()
        assert stats["restarts"] == kills


# -- crash loops ---------------------------------------------------------------------------


def announce_and_maybe_die(conn: sqlite3.Connection) -> None:
    """`init`: write this writer's pid to the FIFO next to the database; die
    during start-up while a ``.crash`` marker file exists."""
    conn.execute(SCHEMA)
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    fifo = os.open(path + ".starts", os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fifo, f"{os.getpid()}\n".encode())
    finally:
        os.close(fifo)
    if os.path.exists(path + ".crash"):
        os.kill(os.getpid(), signal.SIGKILL)


class Starts:
    """The pids that writers announce as they start (see announce_and_maybe_die)."""

    def __init__(self, db_path: Path) -> None:
        os.mkfifo(f"{db_path}.starts")
        # Read-write: no open() blocks, and the writer's non-blocking open finds a reader.
        self._fd = os.open(f"{db_path}.starts", os.O_RDWR | os.O_NONBLOCK)
        self._buffer = b""

    def next(self) -> int:
        while b"\n" not in self._buffer:
            assert select.select([self._fd], [], [], DEADLINE)[0], "no writer started"
            self._buffer += os.read(self._fd, 4096)
        line, self._buffer = self._buffer.split(b"\n", 1)
        return int(line)

    def close(self) -> None:
        os.close(self._fd)


@pytest.fixture
def starts(db_path: Path) -> Iterator[Starts]:
    announced = Starts(db_path)
    try:
        yield announced
    finally:
        announced.close()


def test_a_crash_loop_of_sigkills_ends_and_the_service_comes_back(
    db_path: Path, starts: Starts
) -> None:
    with mpwriter.start(
        db_path,
        init=announce_and_maybe_die,
        context="fork",
        timeout=DEADLINE,
        restart_backoff_max=0.5,
    ) as writer:
        first = starts.next()
        writer.execute("INSERT INTO items(payload) VALUES ('before')")
        began = time.monotonic()
        victim = first
        for _ in range(12):  # each new writer is killed as soon as it announces itself
            sigkill_and_wait(victim)
            victim = starts.next()
        assert time.monotonic() - began < 12.0
        # The kills stop: the writer that announced itself last is left alone.
        call_until_served(
            writer, "INSERT INTO items(payload) VALUES ('after')", time.monotonic() + DEADLINE
        )
        stats = writer.stats()
        assert stats["pid"] == victim
        assert stats["restarts"] == 12
        # It served: the backoff was reset, and its death is repaired at once.
        sigkill_and_wait(victim)
        assert starts.next() != victim
        writer.execute("INSERT INTO items(payload) VALUES ('again')")
    assert count_rows(db_path) == 3


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """mpwriter's log records, also those of the supervisor (forked: it inherits the handler)."""
    path = tmp_path / "mpwriter.log"
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("mpwriter")
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_past_the_burst_limit_calls_fail_fast_until_a_writer_serves_again(
    db_path: Path, starts: Starts, log_file: Path
) -> None:
    crash = Path(f"{db_path}.crash")
    with mpwriter.start(
        db_path,
        init=announce_and_maybe_die,
        context="fork",
        timeout=30.0,
        max_restarts=2,
        restart_backoff_max=0.5,
    ) as writer:
        first = starts.next()
        writer.execute("INSERT INTO items(payload) VALUES ('served')")
        crash.touch()  # from now on every writer dies in its start-up
        sigkill_and_wait(first)
        for _ in range(4):  # 3 young deaths are past max_restarts=2; one try more
            starts.next()

        began = time.monotonic()
        with pytest.raises(mpwriter.WriterCrashed, match="backing off until"):
            writer.execute("INSERT INTO items(payload) VALUES ('refused')")
        # WriterCrashed, not Timeout: it did not wait out its 30 s.
        assert time.monotonic() - began < AT_ONCE + SCHEDULING_SLIP, "not at once"
        with pytest.raises(mpwriter.WriterCrashed, match="not sent"):
            writer.stats()

        crash.unlink()  # the cause goes away: no restart of the app needed
        call_until_served(
            writer, "INSERT INTO items(payload) VALUES ('back')", time.monotonic() + DEADLINE
        )
    log = log_file.read_text()
    assert "writers in a row died before serving; calls fail at once" in log
    assert "starting a writer again" in log
    assert "a writer serves again" in log


def test_close_while_backing_off_returns_at_once_and_leaves_nothing_running(
    db_path: Path, starts: Starts
) -> None:
    crash = Path(f"{db_path}.crash")
    writer = mpwriter.start(
        db_path,
        init=announce_and_maybe_die,
        context="fork",
        timeout=30.0,
        max_restarts=0,
        restart_backoff_max=30.0,
    )
    first = starts.next()
    supervisor = parent_of(first)
    pidfd = os.pidfd_open(supervisor)
    try:
        writer.execute("INSERT INTO items(payload) VALUES ('served')")
        crash.touch()
        sigkill_and_wait(first)
        # Every successor dies young (max_restarts=0: backing off from the first);
        # after 7 the next try is 3.2 s away.
        for _ in range(7):
            starts.next()
        with pytest.raises(mpwriter.WriterCrashed, match="backing off"):
            writer.execute("INSERT INTO items(payload) VALUES ('refused')")
        began = time.monotonic()
        writer.close(timeout=DEADLINE)
        assert time.monotonic() - began < 2.0, "close() waited for the next try"
        assert select.select([pidfd], [], [], 0)[0], "the supervisor outlived close()"
    finally:
        os.close(pidfd)
    assert writer.closed
    with pytest.raises(mpwriter.WriterClosed):
        writer.execute("INSERT INTO items(payload) VALUES ('closed')")
    assert count_rows(db_path) == 1


def test_sigterm_to_the_supervisor_closes_the_writer_gracefully(
    db_path: Path, starts: Starts
) -> None:
    """What systemd's default KillMode sends to every process of the service."""
    with mpwriter.start(
        db_path, init=announce_and_maybe_die, context="fork", timeout=DEADLINE
    ) as writer:
        writer_pid = starts.next()
        writer.execute("INSERT INTO items(payload) VALUES ('before')")
        supervisor = parent_of(writer_pid)
        pidfds = [os.pidfd_open(writer_pid), os.pidfd_open(supervisor)]
        try:
            os.kill(supervisor, signal.SIGTERM)
            for pidfd in pidfds:
                assert select.select([pidfd], [], [], DEADLINE)[0], "still running after SIGTERM"
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
        with pytest.raises(mpwriter.WriterClosed, match="closed"):
            writer.execute("INSERT INTO items(payload) VALUES ('after')")
    wal = Path(f"{db_path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed on the way out
    assert count_rows(db_path) == 1


# -- the owner stays single-threaded ---------------------------------------------------------

FORKS_AFTER_START = """
import os, signal, sys, tempfile, threading
import mpwriter

path = os.path.join(tempfile.mkdtemp(), "app.db")
if sys.argv[1] == "control":
    # Proves the warning reaches stderr: a thread is running at the fork.
    stop = threading.Event()
    threading.Thread(target=stop.wait, args=(30,)).start()
writer = mpwriter.start(path, init="CREATE TABLE IF NOT EXISTS t(x)", context="fork", timeout=10)
writer.execute("INSERT INTO t VALUES (1)")
pid = os.fork()  # what a gunicorn master does after on_starting
if pid == 0:
    writer.execute("INSERT INTO t VALUES (2)")
    os._exit(0)
assert os.waitpid(pid, 0)[1] == 0
victim = writer.stats()["pid"]
os.kill(victim, signal.SIGKILL)  # the supervisor forks a successor
writer.execute("INSERT INTO t VALUES (3)")
assert writer.stats()["pid"] != victim
writer.close()
if sys.argv[1] == "control":
    stop.set()
print("done")
"""


def run_forks_after_start(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-c", FORKS_AFTER_START, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("mode", ["mpwriter", "control"])
def test_no_fork_after_start_is_a_multi_threaded_fork(mode: str) -> None:
    """The pytest configuration turns warnings into errors, which CPython
    discards for this one: the child interpreter shows it on stderr."""
    result = run_forks_after_start(mode)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    warned = "multi-threaded, use of fork() may lead to deadlocks" in result.stderr
    if mode == "control":
        # Python 3.12 added the warning; before, there is nothing to see.
        assert warned == (sys.version_info >= (3, 12)), result.stderr
    else:
        assert not warned, result.stderr


# -- lifelines -------------------------------------------------------------------------------


def own_and_report(db_path: str, report: Connection) -> None:
    """Be the owner: start a writer, write, report the writer's pid; wait to be killed."""
    writer = mpwriter.start(db_path, init=SCHEMA, context="fork", timeout=DEADLINE)
    writer.execute("INSERT INTO items(payload) VALUES ('owned')")
    report.send(writer.stats()["pid"])
    report.poll(60.0)  # killed long before; bounded all the same


def test_a_sigkilled_owner_leaves_no_supervisor_or_writer_behind(db_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    report_r, report_w = ctx.Pipe()
    owner = ctx.Process(target=own_and_report, args=(str(db_path), report_w), daemon=False)
    owner.start()
    report_w.close()
    try:
        assert report_r.poll(DEADLINE), "the owner did not report"
        writer_pid = report_r.recv()
        supervisor_pid = parent_of(writer_pid)
        assert supervisor_pid != owner.pid, "no supervisor stands between owner and writer"
        assert parent_of(supervisor_pid) == owner.pid
        pidfds = [os.pidfd_open(supervisor_pid), os.pidfd_open(writer_pid)]
        try:
            os.kill(owner.pid, signal.SIGKILL)
            for pidfd, what in zip(pidfds, ("supervisor", "writer"), strict=True):
                assert select.select([pidfd], [], [], DEADLINE)[0], f"the {what} outlived the owner"
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
    finally:
        reap(owner)
    # The writer closed rather than died: the WAL was checkpointed away.
    wal = Path(f"{db_path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert count_rows(db_path) == 1


KILLED_SUPERVISOR = """
import logging, os, select, signal, sys
import mpwriter
logging.basicConfig(stream=sys.stderr, format="%(message)s")
writer = mpwriter.start(sys.argv[1], context="fork", restart=False)
pid = writer.stats()["pid"]
with open(f"/proc/{pid}/stat") as stat:
    supervisor = int(stat.read().rsplit(")", 1)[1].split()[1])
pidfd = os.pidfd_open(pid)
os.kill(supervisor, signal.SIGKILL)
print("writer exited" if select.select([pidfd], [], [], 10)[0] else "writer lives")
"""


def test_a_writer_whose_supervisor_is_killed_says_so_and_closes(db_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", KILLED_SUPERVISOR, str(db_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout == "writer exited\n", result.stderr
    # The owner lives on: only the supervisor is gone, and the writer says that.
    assert "owner process is gone" not in result.stderr
    assert (
        "mpwriter: the writer's supervisor is gone (or stops it because its owner is gone); closing"
    ) in result.stderr.splitlines()
