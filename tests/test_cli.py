"""``python -m mpwriter stats PATH``: a running writer's figures, from another process."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mpwriter
from conftest import SCHEMA, Gate, as_nobody

SNAPSHOT_SUFFIX = ".mpwriter-stats.json"


def run_stats(db_path: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpwriter", "stats", str(db_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class Watch:
    """``stats --watch`` in a child process, read line by line with a deadline."""

    def __init__(self, db_path: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mpwriter", "stats", str(db_path), "--watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []

    def next_line(self, timeout: float = 10.0) -> str:
        assert self.process.stdout is not None
        if not select.select([self.process.stdout], [], [], timeout)[0]:
            raise AssertionError(f"no line from --watch within {timeout} s: {self.lines}")
        line = self.process.stdout.readline()
        assert line, f"--watch ended: {self.lines}"
        self.lines.append(line.rstrip("\n"))
        return self.lines[-1]

    def until(self, predicate: Any, timeout: float = 15.0) -> str:
        """The first line for which ``predicate(line)`` is true."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(max(0.0, deadline - time.monotonic()))
            if predicate(line):
                return line

    def interrupt(self) -> int:
        """Ctrl-C; the exit status."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for watch in started:
        watch.kill()


def reading(line: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(line)
    return value


def test_stats_shows_a_running_writers_figures(
    writer: mpwriter.Writer, db_path: Path, watches: list[Watch]
) -> None:
    for n in range(5):
        writer.execute("INSERT INTO items(seq) VALUES (?)", (n,))
    with pytest.raises(sqlite3.OperationalError):
        writer.execute("INSERT INTO nowhere VALUES (1)")
    pid = writer.stats()["pid"]
    # The writer publishes about once a second: watch until its figures are in.
    watch = Watch(db_path, "--json")
    watches.append(watch)
    line = watch.until(lambda line: reading(line).get("stats", {}).get("requests") == 6)
    assert watch.interrupt() == 0

    seen = reading(line)
    assert seen["database"] == str(db_path)
    assert seen["pid"] == pid
    assert seen["state"] == "serving"
    assert seen["stale"] is False
    assert 0 <= seen["age_seconds"] < 3
    assert seen["stats"]["errors_by_class"] == {"OperationalError": 1}
    assert set(seen["stats"]) == set(mpwriter.Stats.__annotations__)

    once = run_stats(db_path, "--json")
    assert once.returncode == 0, once.stderr
    assert json.loads(once.stdout)["stats"]["requests"] == 6

    human = run_stats(db_path)
    assert human.returncode == 0, human.stderr
    assert f"mpwriter writer of {db_path}: pid {pid}, serving" in human.stdout
    assert "requests   6 in 6 batches" in human.stdout
    assert "errors     1 (OperationalError 1)" in human.stdout
    assert "STALE" not in human.stdout

    prometheus = run_stats(db_path, "--prometheus")
    assert prometheus.returncode == 0, prometheus.stderr
    families = {f.name: f for f in text_string_to_metric_families(prometheus.stdout)}
    assert families["mpwriter_requests"].samples[0].value == 6


def test_watch_prints_a_compact_line_every_second_until_ctrl_c(
    writer: mpwriter.Writer, db_path: Path, watches: list[Watch]
) -> None:
    watch = Watch(db_path)
    watches.append(watch)
    header = watch.next_line()
    for column in ("state", "queue", "req/s", "batch", "p50 ms", "p99 ms", "restarts", "age s"):
        assert column in header
    first = watch.next_line()
    assert first.split()[1] == "serving"
    for n in range(40):
        writer.execute("INSERT INTO items(seq) VALUES (?)", (n,))
    # Requests per second come from two snapshots: some line shows them.
    line = watch.until(lambda line: line.split()[3] not in ("-", "0"))
    fields = line.split()
    assert fields[1] == "serving"
    assert int(fields[3]) > 0  # req/s
    assert float(fields[4]) >= 1  # requests per batch
    assert fields[7] == "0"  # restarts
    assert watch.interrupt() == 0


def test_stats_exits_non_zero_naming_the_path_when_no_writer_serves_it(db_path: Path) -> None:
    never = run_stats(db_path)
    assert never.returncode == 1
    assert never.stdout == ""
    assert never.stderr == f"mpwriter: no writer serves {db_path}\n"

    with mpwriter.start(db_path, init=SCHEMA, context="fork") as writer:
        writer.stats()  # served after the writer's first snapshot
        assert os.path.exists(f"{db_path}{SNAPSHOT_SUFFIX}")
        assert run_stats(db_path).returncode == 0
    # A clean shutdown removes the snapshot.
    assert not os.path.exists(f"{db_path}{SNAPSHOT_SUFFIX}")
    closed = run_stats(db_path, "--json")
    assert closed.returncode == 1
    assert closed.stderr == f"mpwriter: no writer serves {db_path}\n"


def test_figures_left_by_a_killed_writer_are_not_shown_as_live(db_path: Path) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork", restart=False) as writer:
        pid = writer.stats()["pid"]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(mpwriter.WriterCrashed):
            writer.execute("INSERT INTO items(seq) VALUES (1)")
        # The snapshot outlived its writer; the lock did not.
        assert os.path.exists(f"{db_path}{SNAPSHOT_SUFFIX}")
        result = run_stats(db_path)
    assert result.returncode == 1
    assert result.stderr == (
        f"mpwriter: no writer serves {db_path} (figures left by writer pid {pid}, which is gone)\n"
    )


def test_a_restarted_writer_publishes_its_own_figures(db_path: Path) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork") as writer:
        first = writer.stats()["pid"]
        os.kill(first, signal.SIGKILL)
        second = writer.stats()  # served by the successor, after its first snapshot
        assert second["pid"] != first
        result = run_stats(db_path, "--json")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["pid"] == second["pid"]
    assert seen["stats"]["restarts"] == 1


def test_a_stuck_writer_is_still_reported_with_a_growing_age(
    writer: mpwriter.Writer, db_path: Path, gate: Gate, watches: list[Watch]
) -> None:
    writer.execute("INSERT INTO items(seq) VALUES (1)")
    gate.hold(writer)  # the writer is inside a call() that does not return
    futures = [writer.submit("INSERT INTO items(seq) VALUES (2)") for _ in range(3)]
    watch = Watch(db_path, "--json")
    watches.append(watch)
    # Reading goes around the request queue: the figures keep coming, and
    # their age grows while the writer cannot publish.
    stale = reading(watch.until(lambda line: reading(line).get("stale") is True))
    later = reading(watch.next_line())
    assert stale["state"] == later["state"] == "busy"
    assert later["age_seconds"] > stale["age_seconds"] > 3
    human = run_stats(db_path)
    assert human.returncode == 0, human.stderr
    assert "STALE: the writer has not come back from a batch" in human.stdout
    assert watch.interrupt() == 0
    gate.release()
    assert gate.future.result(timeout=10) == "released"
    for future in futures:
        assert future.result(timeout=10).rowcount == 1


def test_the_snapshot_takes_the_databases_permissions_and_follows_no_symlink(
    db_path: Path, tmp_path: Path
) -> None:
    sqlite3.connect(db_path).close()
    os.chmod(db_path, 0o640)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("untouched")
    os.chmod(elsewhere, 0o600)
    snapshot = Path(f"{db_path}{SNAPSHOT_SUFFIX}")
    snapshot.symlink_to(elsewhere)
    with mpwriter.start(db_path, init=SCHEMA, context="fork") as writer:
        writer.stats()  # served after the writer's first snapshot
        assert not snapshot.is_symlink()
        assert snapshot.stat().st_mode & 0o777 == 0o640
        assert json.loads(snapshot.read_text())["pid"] == writer.stats()["pid"]
    assert elsewhere.read_text() == "untouched"
    assert elsewhere.stat().st_mode & 0o777 == 0o600
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_a_writer_that_cannot_publish_serves_on(db_path: Path, tmp_path: Path) -> None:
    # A directory where the snapshot goes: every publish fails.
    os.mkdir(f"{db_path}{SNAPSHOT_SUFFIX}")
    with mpwriter.start(db_path, init=SCHEMA, context="fork") as writer:
        assert writer.execute("INSERT INTO items(seq) VALUES (1)").rowcount == 1
        result = run_stats(db_path)
        assert result.returncode == 3
        assert result.stderr == f"mpwriter: {db_path}{SNAPSHOT_SUFFIX} is not a writer's snapshot\n"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_stats_refuses_a_url() -> None:
    result = run_stats("postgresql://app@localhost/app")
    assert result.returncode == 2
    assert "only SQLite files can be watched so far" in result.stderr


@pytest.mark.parametrize("forgery", ["another user's file", "writable by others"])
def test_stats_refuses_figures_another_user_could_have_forged(
    forgery: str, writer: mpwriter.Writer, db_path: Path, gate: Gate
) -> None:
    pid = writer.stats()["pid"]  # served after the writer's first snapshot
    assert run_stats(db_path).returncode == 0
    gate.hold(writer)  # the writer cannot publish (and so replace the file) meanwhile
    snapshot = Path(f"{db_path}{SNAPSHOT_SUFFIX}")
    try:
        if forgery == "another user's file":
            if os.geteuid() != 0:
                pytest.skip("gives a file to another user: needs root")
            os.chown(snapshot, 65534, 65534)
            reason = f"it belongs to uid 65534, the writer's lock file to uid {os.geteuid()}"
        else:
            os.chmod(snapshot, 0o666)
            reason = "other users may write it (mode 0666)"
        # The figures are well formed and their pid holds the lock: only who
        # could have written them tells them apart.
        assert json.loads(snapshot.read_text())["pid"] == pid
        for args in ((), ("--json",), ("--prometheus",)):
            assert_refused_as_forged(db_path, reason, *args)
    finally:
        gate.release()
    assert gate.future.result(timeout=10) == "released"


def _forge_a_writer(db: Path, genuine: dict[str, Any]) -> str:
    """Hold a lock file of one's own and publish forged figures naming oneself."""
    lock = os.open(f"{db}.mpwriter.lock", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # kept until the child exits
    forged = os.open(f"{db}{SNAPSHOT_SUFFIX}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(forged, json.dumps({**genuine, "pid": os.getpid()}).encode())
    os.close(forged)
    return "forged"


def assert_refused_as_forged(db_path: Path, reason: str, *args: str) -> None:
    result = run_stats(db_path, *args)
    assert result.returncode == 4
    assert result.stdout == ""
    assert result.stderr == (
        f"mpwriter: not showing the figures in {db_path}{SNAPSHOT_SUFFIX}: {reason},"
        " so they may be forged\n"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="acts as another user: needs root")
def test_stats_refuses_a_lock_and_figures_planted_beside_another_users_database() -> None:
    # A directory everyone may write, as /tmp: "nobody" plants a lock file
    # it holds and a snapshot naming itself, beside root's database.
    shared = Path(tempfile.mkdtemp(prefix="mpwriter-shared-"))
    try:
        os.chmod(shared, 0o1777)
        db = shared / "app.db"
        with mpwriter.start(db, init=SCHEMA, context="fork") as writer:
            writer.stats()  # served after the writer's first snapshot
            genuine = json.loads(Path(f"{db}{SNAPSHOT_SUFFIX}").read_text())
        os.unlink(f"{db}.mpwriter.lock")
        with as_nobody(lambda: _forge_a_writer(db, genuine)) as outcome:
            assert outcome == "forged"
            assert_refused_as_forged(db, "it belongs to uid 65534, the database to uid 0")
    finally:
        shutil.rmtree(shared)


def test_a_path_that_looks_like_a_url_is_a_file_to_every_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only postgresql:// and postgres:// name a server; "x://y.db" is the
    # file y.db in the directory "x:" to start(), the publisher, reader() and the CLI.
    monkeypatch.chdir(tmp_path)
    os.mkdir("x:")
    with mpwriter.start("x://y.db", init=SCHEMA, context="fork") as writer:
        assert writer.execute("INSERT INTO items(seq) VALUES (1)").rowcount == 1
        writer.stats()  # served after the writer's first snapshot
        assert (tmp_path / "x:" / f"y.db{SNAPSHOT_SUFFIX}").is_file()
        result = run_stats("x://y.db", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["database"] == str(tmp_path / "x:" / "y.db")
        with mpwriter.reader("x://y.db") as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 1
