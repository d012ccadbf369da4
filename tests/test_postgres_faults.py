"""PostgreSQL faults: the server restarts under load.

The test starts its own throw-away cluster (initdb, ~2 s) so that restarting
it disturbs nobody else. It needs PostgreSQL's server programs (Debian's
``postgresql`` package); without them it skips, and fails in CI.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

import mpwriter
from conftest import PG_SCHEMA, pg_count

pytest.importorskip("psycopg", reason="PostgreSQL tests: psycopg is not installed")

INSERT = "INSERT INTO items(client, seq) VALUES (?, ?)"
CALL_TIMEOUT = 3.0
OVERRUN_MARGIN = 1.5  # seconds past its timeout that a call may take to return


class Cluster:
    """A private PostgreSQL cluster in a temporary directory, run as the postgres user."""

    def __init__(self, bin_dir: str) -> None:
        self.bin_dir = bin_dir
        self.directory = tempfile.mkdtemp(prefix="mpwriter-test-pg-")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        command = [os.path.join(self.bin_dir, program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init_and_start(self) -> None:
        data = os.path.join(self.directory, "data")
        self._run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync")
        self.pg_ctl("start")

    def pg_ctl(self, action: str, *args: str) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.directory}"
        self._run(
            "pg_ctl",
            "-D",
            os.path.join(self.directory, "data"),
            "-l",
            os.path.join(self.directory, "log"),
            "-w",
            "-t",
            "30",
            "-o",
            options,
            action,
            *args,
        )

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running: nothing to stop
            self.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found or (os.geteuid() == 0 and shutil.which("runuser") is None):
        message = "PostgreSQL fault tests: no initdb (install Debian's postgresql package)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    private = Cluster(os.path.dirname(found[-1]))
    try:
        private.init_and_start()
        yield private
    finally:
        private.remove()


def test_server_restart_under_load(cluster: Cluster) -> None:
    writer = mpwriter.start(cluster.url, init=PG_SCHEMA, timeout=CALL_TIMEOUT, context="fork")
    acknowledged: list[tuple[int, int]] = []
    errors: Counter[str] = Counter()
    overruns: list[float] = []
    messages: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    restarted_at: list[float] = []
    first_ack_after_restart: list[float] = []

    def client(number: int) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            began = time.monotonic()
            try:
                writer.execute(
                    "INSERT INTO items(client, seq) VALUES (?, ?)",
                    (number, seq),
                    timeout=CALL_TIMEOUT,
                )
            except mpwriter.Error as exc:
                with lock:
                    errors[type(exc).__name__] += 1
                    if not isinstance(exc, mpwriter.Timeout):
                        messages.append(str(exc))
            else:
                with lock:
                    acknowledged.append((number, seq))
                    if restarted_at and not first_ack_after_restart:
                        first_ack_after_restart.append(time.monotonic())
            took = time.monotonic() - began
            if took > CALL_TIMEOUT + OVERRUN_MARGIN:
                with lock:
                    overruns.append(took)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while len(acknowledged) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)  # sleep-ok: polling a counter the client threads fill
        assert len(acknowledged) >= 200, "no load before the restart"
        cluster.pg_ctl("restart", "-m", "fast")
        restarted_at.append(time.monotonic())
        goal = len(acknowledged) + 200
        while len(acknowledged) < goal and time.monotonic() < deadline + 20:
            time.sleep(0.01)  # sleep-ok: polling a counter the client threads fill
    finally:
        stop.set()
        for thread in threads:
            thread.join(CALL_TIMEOUT + OVERRUN_MARGIN + 5)
    stats = writer.stats()
    writer.close(timeout=10)
    assert first_ack_after_restart, f"no write succeeded after the restart; errors {errors}"
    assert first_ack_after_restart[0] - restarted_at[0] < 5.0
    assert not overruns, f"calls overran their timeout: {overruns}"
    assert set(errors) <= {"ServerUnavailable", "OutcomeUnknown", "Timeout"}, errors
    with mpwriter.reader(cluster.url) as conn:
        stored = set(conn.execute("SELECT client, seq FROM items").fetchall())
    lost = set(acknowledged) - stored
    assert not lost, f"{len(lost)} acknowledged rows are missing"
    assert pg_count(cluster.url) >= len(acknowledged)
    # Every error says whether the outcome is known.
    assert all("not applied" in m or "outcome is unknown" in m for m in messages), messages
    assert stats["retries"] >= 1  # the writer reconnected


def test_writer_sigkills_under_load_lose_no_acknowledged_row(pg_url: str) -> None:
    """tests/kill_writer.py's run, on PostgreSQL: the server rolls back a dead writer's batch."""
    import _faults
    import kill_writer

    _faults.reset_postgres(pg_url)
    report = kill_writer.run(pg_url, kills=8, clients=4, call_timeout=5.0)
    seed = f"(seed {report.seed})"
    assert report.problems() == {}, seed
    assert report.acknowledged > 8, seed  # writes went through after every kill
    audit = report.audit
    assert audit is not None
    assert audit.rows == report.acknowledged + audit.unacknowledged
    assert set(report.errors_by_class) <= {"WriterCrashed", "Timeout"}, report.errors_by_class
