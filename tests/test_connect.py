"""`mpwriter.connect`: handles for processes outside the owner's tree.

Clients are `connect_client.py` run with ``start_new_session=True`` (not
children of the writer's owner, as a cron job or a task worker would be);
they say what they did on stdout, line by line, and every wait on them has a
deadline. Each row a client sends has a fresh sequence number, so a row found
twice was applied twice.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import multiprocessing
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mpwriter
from conftest import NOBODY, as_nobody, reap_pid
from connect_client import INSERT, LOG_TABLE

HERE = Path(__file__).resolve().parent
CLIENT = str(HERE / "connect_client.py")


class Client:
    """A `connect_client.py` process in a session of its own, read line by line."""

    def __init__(self, mode: str, database: Path | str, client: int, *extra: str) -> None:
        # faulthandler: a client stuck past its deadline is sent SIGABRT and
        # shows where it was.
        env = dict(os.environ, PYTHONPATH=str(HERE.parent), PYTHONFAULTHANDLER="1")
        self.process = subprocess.Popen(
            [sys.executable, CLIENT, mode, str(database), str(client), *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
        self.client = client
        self.lines: list[str] = []
        self._buffer = b""

    @property
    def acks(self) -> list[int]:
        return [int(line.split()[1]) for line in self.lines if line.startswith("ack ")]

    def until(self, predicate: Any, timeout: float = 20.0) -> None:
        """Read lines until ``predicate(self)`` holds; fail at the deadline or at EOF."""
        deadline = time.monotonic() + timeout
        stdout = self.process.stdout
        assert stdout is not None
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                raise AssertionError(f"client {self.client} did not get there: {self.lines[-5:]}")
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(
                    f"client {self.client} exited: {self.lines[-5:]} {self.stderr()}"
                )
            self._buffer += chunk
            *complete, self._buffer = self._buffer.split(b"\n")
            self.lines.extend(line.decode() for line in complete)

    def stop(self, timeout: float = 20.0) -> None:
        """Ask a ``keep`` client to stop; read its lines to the end; reap it."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"stop\n")
        self.process.stdin.flush()
        self.finish(timeout)

    def finish(self, timeout: float = 20.0) -> None:
        self.until(lambda c: "done" in c.lines, timeout)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)
            self.process.wait(10)
            raise AssertionError(f"client {self.client} did not exit: {self.stderr()}") from None
        assert code == 0, self.stderr()

    def stderr(self) -> str:
        if self.process.poll() is None:
            return "(running)"
        assert self.process.stderr is not None
        return self.process.stderr.read().decode(errors="replace")[-2000:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    started: list[Client] = []
    yield started
    for client in started:
        client.kill()


def rows_by_client(database: Path | str) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    with mpwriter.reader(database) as conn:
        for client, seq in conn.execute("SELECT client, seq FROM log ORDER BY client, seq"):
            found.setdefault(client, []).append(seq)
    return found


def assert_acked_present_once(database: Path | str, clients: list[Client]) -> None:
    """Every acknowledged row is there; no row of any client is there twice."""
    found = rows_by_client(database)
    for client in clients:
        rows = found.get(client.client, [])
        assert len(rows) == len(set(rows)), f"client {client.client}: a row applied twice"
        missing = set(client.acks) - set(rows)
        assert not missing, f"client {client.client}: acknowledged rows lost: {sorted(missing)}"


def start_writer(database: Path | str, **options: Any) -> mpwriter.Writer:
    options.setdefault("timeout", 10.0)
    return mpwriter.start(database, init=LOG_TABLE, context="fork", **options)


def test_connect_raises_writer_unavailable_when_no_writer_serves(db_path: Path) -> None:
    with pytest.raises(mpwriter.WriterUnavailable, match="no writer serves"):
        mpwriter.connect(db_path)
    start_writer(db_path).close()
    with pytest.raises(mpwriter.WriterUnavailable, match="no writer serves"):
        mpwriter.connect(db_path)  # its endpoint left with it


def test_connect_keeps_a_urls_password_out_of_its_errors(tmp_path: Path) -> None:
    with pytest.raises(mpwriter.WriterUnavailable) as caught:
        mpwriter.connect("postgresql://app:secret@db/app", endpoint=tmp_path / "pg.sock")
    assert "secret" not in str(caught.value)
    assert "postgresql://db/app" in str(caught.value)


def test_the_endpoint_is_a_socket_beside_the_database_without_access_for_others(
    db_path: Path,
) -> None:
    with start_writer(db_path):
        endpoint = os.lstat(f"{db_path}.mpwriter.sock")
        assert endpoint.st_mode & 0o077 == 0
        assert endpoint.st_uid == os.geteuid()


def test_a_stale_endpoint_is_replaced_and_a_symlink_there_is_never_followed(
    db_path: Path,
) -> None:
    import socket

    endpoint = Path(f"{db_path}.mpwriter.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(endpoint))  # left by a writer that was killed: nothing listens
    stale.close()
    with pytest.raises(mpwriter.WriterUnavailable, match="stale"):
        mpwriter.connect(db_path)
    with start_writer(db_path):
        mpwriter.connect(db_path).execute(INSERT, (1, 0))
    target = db_path.parent / "target"
    target.write_text("untouched")
    endpoint.symlink_to(target)
    with pytest.raises(mpwriter.WriterUnavailable, match="not a socket"):
        mpwriter.connect(db_path)
    with start_writer(db_path):
        assert endpoint.is_socket()
        assert not endpoint.is_symlink()
        mpwriter.connect(db_path).execute(INSERT, (1, 1))
    assert target.read_text() == "untouched"
    assert rows_by_client(db_path)[1] == [0, 1]


def test_an_endpoint_deeper_than_an_af_unix_address_allows_still_works(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["a-directory-name-of-forty-characters-long"] * 4)
    deep.mkdir(parents=True)
    database = deep / "app.db"
    assert len(f"{database}.mpwriter.sock") > 108
    with start_writer(database):
        mpwriter.connect(database).execute(INSERT, (1, 0))
    assert rows_by_client(database)[1] == [0]


def _write_inherited(writer: mpwriter.Writer, client: int, count: int) -> None:
    for seq in range(count):
        writer.execute(INSERT, (client, seq))


def test_unrelated_process_trees_write_beside_inherited_children(
    db_path: Path, clients: list[Client]
) -> None:
    count = 200
    with start_writer(db_path) as writer:
        clients.extend(Client("write", db_path, n, str(count)) for n in range(3))
        ctx = multiprocessing.get_context("fork")
        children = [
            ctx.Process(target=_write_inherited, args=(writer, 100 + n, count)) for n in range(2)
        ]
        for child in children:
            child.start()
        for client in clients:
            client.finish()
        for child in children:
            child.join(30)
            assert child.exitcode == 0
        found = rows_by_client(db_path)
    for client in clients:
        assert client.acks == list(range(count))
    assert_acked_present_once(db_path, clients)
    for n in (100, 101):
        assert found[n] == list(range(count))


def test_a_connected_handle_works_in_a_forked_child_and_after_its_parent_wrote(
    db_path: Path,
) -> None:
    with start_writer(db_path):
        connected = mpwriter.connect(db_path)
        connected.execute(INSERT, (1, 0))
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                connected.execute(INSERT, (1, 1))
                code = 0
            finally:
                os._exit(code)
        reap_pid(pid)
        connected.execute(INSERT, (1, 2))
        connected.close()
    assert rows_by_client(db_path)[1] == [0, 1, 2]


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _descriptors() -> set[tuple[int, int, int]]:
    """This process's descriptors, each with the device and inode it refers to.

    A leak shows as an entry that was not there before, even when another
    test's garbage, collected meanwhile, closed a descriptor and the leaked
    one took its number; unlike a count, it does not fall when that happens.
    """
    held = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            st = os.fstat(int(name))
            held.add((int(name), st.st_dev, st.st_ino))
    return held


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def _connect_write_exit(database: Path, client: int) -> None:
    """In a forked child: a fresh connection (not the inherited handle), one write, exit."""
    code = 1
    try:
        writer = mpwriter.connect(database, timeout=10.0)
        writer.execute(INSERT, (client, 0))
        code = 0
    finally:
        os._exit(code)


@pytest.mark.timeout(120)  # 1000 processes on a 2-core machine shared with others
def test_short_lived_connecting_processes_leave_no_descriptors_behind(db_path: Path) -> None:
    processes, at_once = 1000, 16
    with start_writer(db_path) as writer:
        warm = mpwriter.connect(db_path)
        warm.execute(INSERT, (-1, 0))
        warm.close()
        writer_pid = writer.stats()["pid"]
        supervisor_pid = _parent_of(writer_pid)
        before = (_fd_count(writer_pid), _fd_count(supervisor_pid))
        running: list[int] = []
        for client in range(processes):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                _connect_write_exit(db_path, client)
            running.append(pid)
            if len(running) == at_once:
                for done in running:
                    reap_pid(done)
                running.clear()
        for done in running:
            reap_pid(done)
        # The writer drops a gone caller's pipe at its housekeeping, once a second.
        deadline = time.monotonic() + 10.0
        while True:
            after = (_fd_count(writer_pid), _fd_count(supervisor_pid))
            if after[0] <= before[0] and after[1] <= before[1]:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)  # sleep-ok: nothing signals the writer's housekeeping
        figures = writer.stats()
    assert after[1] <= before[1], f"supervisor descriptors grew: {before} -> {after}"
    assert after[0] <= before[0], f"writer descriptors grew: {before} -> {after}"
    assert figures["reply_pipes"] <= 2
    assert sorted(rows_by_client(db_path)) == [-1, *range(processes)]


def _scratch_dir(mode: int) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="mpwriter-connect-"))
    directory.chmod(mode)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory anyone may enter (pytest's tmp_path is for root only)."""
    yield from _scratch_dir(0o755)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
@pytest.mark.parametrize("opened_by_hand", [False, True], ids=["as-created", "chmod-777"])
def test_another_user_is_refused_and_nothing_is_applied(
    shared_dir: Path, opened_by_hand: bool, clients: list[Client]
) -> None:
    database = shared_dir / "app.db"
    with start_writer(database):
        if opened_by_hand:
            # The kernel then lets the peer in: the endpoint's own check refuses it.
            os.chmod(f"{database}.mpwriter.sock", 0o777)
        clients.append(Client("as-nobody", database, 7))
        clients[0].until(lambda c: c.lines)
        assert clients[0].process.wait(10) == 0
        verdict = clients[0].lines[0]
    assert verdict.startswith("refused AccessDenied True"), verdict
    if opened_by_hand:
        assert "uid 65534 may not use this writer" in verdict
    assert 7 not in rows_by_client(database)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_the_group_given_to_start_may_connect(shared_dir: Path, clients: list[Client]) -> None:
    database = shared_dir / "app.db"
    with start_writer(database, allow_group="nogroup"):
        endpoint = os.lstat(f"{database}.mpwriter.sock")
        assert endpoint.st_mode & 0o007 == 0
        assert endpoint.st_gid == 65534
        clients.append(Client("as-nobody", database, 7))
        clients[0].until(lambda c: c.lines)
        assert clients[0].process.wait(10) == 0
        assert clients[0].lines == ["connected"], clients[0].stderr()
    assert rows_by_client(database)[7] == [0]


def test_writer_sigkill_under_connected_load(db_path: Path, clients: list[Client]) -> None:
    with start_writer(db_path) as writer:
        clients.extend(Client("keep", db_path, n) for n in range(3))
        for client in clients:
            client.until(lambda c: len(c.acks) >= 20)
        os.kill(writer.stats()["pid"], signal.SIGKILL)
        marks = [len(client.acks) for client in clients]
        for client, mark in zip(clients, marks, strict=True):
            client.until(lambda c, mark=mark: len(c.acks) >= mark + 20)
        for client in clients:
            client.stop()
        assert writer.stats()["restarts"] == 1
    assert_acked_present_once(db_path, clients)


def test_a_connected_process_goes_on_with_the_writer_of_a_new_owner(
    db_path: Path, clients: list[Client]
) -> None:
    first = start_writer(db_path)
    try:
        clients.append(Client("keep", db_path, 1))
        client = clients[0]
        client.until(lambda c: len(c.acks) >= 20)
        first.close()
        # While none serves, its calls fail at once, saying so.
        client.until(lambda c: any("no writer serves" in line for line in c.lines))
        mark = len(client.acks)
        second = start_writer(db_path)
    except BaseException:
        first.close()
        raise
    with second:
        client.until(lambda c: len(c.acks) >= mark + 20)
        client.stop()
    errors = [line for line in client.lines if line.startswith("error")]
    assert all("WriterClosed" in line for line in errors), errors[:3]
    assert_acked_present_once(db_path, clients)


@pytest.mark.timeout(90)  # 8 interpreters starting at once on a 2-core machine
def test_start_or_connect_raced_by_eight_processes_starts_exactly_one_writer(
    db_path: Path, clients: list[Client]
) -> None:
    count = 20
    clients.extend(Client("race", db_path, n, str(count)) for n in range(8))
    for client in clients:
        client.until(lambda c: "loaded" in c.lines, 60)
    for client in clients:
        assert client.process.stdin is not None
        client.process.stdin.write(b"go\n")
        client.process.stdin.flush()
    for client in clients:
        client.until(lambda c: "done" in c.lines, 60)
    roles = sorted(
        line for client in clients for line in client.lines if line in ("owner", "connected")
    )
    assert roles == ["connected"] * 7 + ["owner"]
    for client in clients:
        assert client.acks == list(range(count))
    assert_acked_present_once(db_path, clients)
    for client in clients:
        if "connected" in client.lines:
            client.stop()
    owner = next(client for client in clients if "owner" in client.lines)
    owner.stop()


def test_an_owner_that_dropped_its_handle_still_stops_its_writer_at_exit(db_path: Path) -> None:
    """start_or_connect's caller may drop the handle it got from start(): the
    process must still exit, and its writer with it (multiprocessing joins
    the supervisor at exit, which waits for its owner to close)."""
    script = (
        "import gc, sys, mpwriter\n"
        "def use():\n"
        "    mpwriter.start(sys.argv[1]).execute('CREATE TABLE t(x)')\n"
        "use(); gc.collect()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), PYTHONFAULTHANDLER="1")
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(db_path)], env=env, start_new_session=True
    )
    try:
        assert owner.wait(20) == 0
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
            owner.wait(10)
    with pytest.raises(mpwriter.WriterUnavailable):
        mpwriter.connect(db_path)


_EXIT_HOLDING_HANDLES = f"""
import os, sys, mpwriter, mpwriter.dbapi
database = sys.argv[1]
# dbapi keeps its handle on the file for the process after the connection closes.
connection = mpwriter.dbapi.connect(database)
connection.execute({INSERT!r}, (1, 1))
connection.commit()
connection.close()
held = mpwriter.connect(database)
held.execute({INSERT!r}, (1, 2))
pid = os.fork()
if pid == 0:
    held.execute({INSERT!r}, (1, 3))
    sys.exit(0)  # through the interpreter's teardown, with the inherited handle
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
print("exiting", flush=True)
"""


def test_a_process_exiting_with_handles_open_leaves_no_descriptor_unclosed(db_path: Path) -> None:
    """Handles alive at exit (a cache's, a global, a forked child's copy) are
    closed as the interpreter ends, not destroyed open: Python's development
    mode reports a socket destroyed open as a ResourceWarning on stderr."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), PYTHONFAULTHANDLER="1")
    command = [sys.executable, "-X", "dev", "-W", "error::ResourceWarning"]
    with start_writer(db_path):
        done = subprocess.run(
            [*command, "-c", _EXIT_HOLDING_HANDLES, str(db_path)],
            check=False,  # the code is asserted with what the process printed
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.returncode, done.stdout) == (0, "exiting\n"), done.stderr
        assert "ResourceWarning" not in done.stderr, done.stderr
        assert rows_by_client(db_path) == {1: [1, 2, 3]}


def test_a_postgresql_writer_accepts_connections_at_the_endpoint_its_owner_gives(
    pg_fresh: str, tmp_path: Path
) -> None:
    import psycopg

    endpoint = tmp_path / "pg.sock"
    with pytest.raises(ValueError, match="endpoint"):
        mpwriter.connect(pg_fresh)  # a URL has no file to sit beside
    with mpwriter.start(pg_fresh, init=LOG_TABLE, context="fork", endpoint=endpoint):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child: a fresh connection
            code = 1
            try:
                mpwriter.connect(pg_fresh, endpoint=endpoint).execute(INSERT, (5, 0))
                code = 0
            finally:
                os._exit(code)
        reap_pid(pid)
        connected = mpwriter.connect(pg_fresh, endpoint=endpoint)
        connected.execute(INSERT, (5, 1))
        connected.close()
        # No lock file admits one PostgreSQL writer: a live endpoint is left alone.
        with pytest.raises(
            mpwriter.WriterAlreadyRunning, match="another mpwriter writer answers"
        ) as in_use:
            mpwriter.start(pg_fresh, context="fork", endpoint=endpoint)
        assert isinstance(in_use.value, OSError)
        mpwriter.connect(pg_fresh, endpoint=endpoint).close()
    assert not endpoint.exists()
    with psycopg.connect(pg_fresh) as conn:
        rows = conn.execute("SELECT seq FROM log WHERE client = 5 ORDER BY seq").fetchall()
    assert rows == [(0,), (1,)]


def test_a_connected_process_killed_mid_request_harms_nobody(
    db_path: Path, clients: list[Client]
) -> None:
    with start_writer(db_path) as writer:
        baseline = writer.stats()["reply_pipes"]
        clients.extend(Client("keep", db_path, n) for n in range(3))
        for client in clients:
            client.until(lambda c: len(c.acks) >= 20)
        victim, *others = clients
        os.killpg(victim.process.pid, signal.SIGKILL)  # whatever it was doing
        assert victim.process.wait(10) == -signal.SIGKILL
        marks = [len(client.acks) for client in others]
        for client, mark in zip(others, marks, strict=True):
            client.until(lambda c, mark=mark: len(c.acks) >= mark + 50)
        for client in others:
            client.stop()
        assert not [line for client in others for line in client.lines if "error" in line]
        # The victim's pipe goes at the writer's housekeeping, once a second.
        deadline = time.monotonic() + 10.0
        while writer.stats()["reply_pipes"] > baseline and time.monotonic() < deadline:
            time.sleep(0.2)  # sleep-ok: nothing signals the writer's housekeeping
        assert writer.stats()["reply_pipes"] <= baseline
    assert_acked_present_once(db_path, clients)


def _write_through(writer: mpwriter.Writer, client: int) -> None:
    writer.execute(INSERT, (client, 0))


def test_a_connected_handle_passes_to_a_spawned_child_and_re_dials_there(db_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    first = start_writer(db_path)
    connected = mpwriter.connect(db_path)
    child = ctx.Process(target=_write_through, args=(connected, 1))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    first.close()
    with start_writer(db_path):
        # Made from the first writer's handle: it finds the second by itself.
        child = ctx.Process(target=_write_through, args=(connected, 2))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        connected.execute(INSERT, (3, 0))
    assert sorted(rows_by_client(db_path)) == [1, 2, 3]


class SilentEndpoint:
    """A socket at a writer's endpoint, of this user, that takes connections
    and never answers: an endpoint whose supervisor is stopped or stuck."""

    def __init__(self, database: Path) -> None:
        self.path = str(database.resolve()) + ".mpwriter.sock"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a closed writer's endpoint, if it left one
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(self.path)
        self.sock.listen(64)  # connections complete in the backlog; none is answered

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


def test_a_connected_handle_whose_endpoint_does_not_answer_fails_within_the_calls_timeout(
    db_path: Path,
) -> None:
    with start_writer(db_path):
        connected = mpwriter.connect(db_path, timeout=10.0)
        connected.execute(INSERT, (1, 0))
    silent = SilentEndpoint(db_path)
    try:
        started = time.monotonic()
        with pytest.raises(mpwriter.WriterClosed, match="not sent"):
            connected.execute(INSERT, (1, 1), timeout=0.3)
        assert time.monotonic() - started < 2.0  # the dial waited 5 s whatever the timeout
        # A thread that dials holds back no other thread past its own bound.
        outcome: list[BaseException] = []

        def dial() -> None:
            try:
                connected.execute(INSERT, (1, 2), timeout=4.0)
            except BaseException as exc:  # asserted below, in the test's thread
                outcome.append(exc)

        dialing = threading.Thread(target=dial)
        dialing.start()
        started = time.monotonic()
        assert connected.post(INSERT, (1, 3), max_block=0.05) is False
        with pytest.raises(mpwriter.WriterClosed, match="not sent"):
            connected.execute(INSERT, (1, 4), timeout=0.3)
        assert time.monotonic() - started < 2.0
        dialing.join(10.0)
        assert not dialing.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], mpwriter.WriterClosed), repr(outcome[0])
    finally:
        silent.close()
        connected.close()
    assert rows_by_client(db_path) == {1: [0]}


def test_threads_calling_while_the_handle_dials_a_new_writer_lose_nothing(
    db_path: Path,
) -> None:
    """Every acknowledged write is there; a failed call says it was not sent,
    never "outcome unknown" (a request paired with another writer's pipe)."""
    first = start_writer(db_path)
    connected = mpwriter.connect(db_path, timeout=10.0)
    stop = threading.Event()
    progress = threading.Condition()
    acks: dict[int, list[int]] = {n: [] for n in range(4)}
    errors: list[BaseException] = []

    def write(client: int) -> None:
        for seq in itertools.count():
            if stop.is_set():
                return
            try:
                connected.execute(INSERT, (client, seq))
            except mpwriter.Error as exc:
                errors.append(exc)
            else:
                with progress:
                    acks[client].append(seq)
                    progress.notify_all()

    threads = [threading.Thread(target=write, args=(n,)) for n in acks]
    for thread in threads:
        thread.start()
    second = None
    try:
        marks = wait_for_acks(progress, acks, dict.fromkeys(acks, 20))
        first.close()
        second = start_writer(db_path)
        wait_for_acks(progress, acks, {n: marks[n] + 20 for n in acks})
    finally:
        stop.set()
        for thread in threads:
            thread.join(30.0)
        first.close()
        if second is not None:
            second.close()
        connected.close()
    assert not any(thread.is_alive() for thread in threads)
    assert all(isinstance(exc, mpwriter.WriterUnavailable) for exc in errors), errors[:3]
    assert not any(isinstance(exc, mpwriter.Timeout) for exc in errors), errors[:3]
    found = rows_by_client(db_path)
    for client, seqs in acks.items():
        rows = found.get(client, [])
        assert len(rows) == len(set(rows))
        assert set(seqs) <= set(rows), sorted(set(seqs) - set(rows))[:5]


def wait_for_acks(
    progress: threading.Condition, acks: dict[int, list[int]], targets: dict[int, int]
) -> dict[int, int]:
    """Wait (10 s at most) until each client has its target count of acks; the counts."""
    with progress:
        reached = progress.wait_for(lambda: all(len(acks[n]) >= targets[n] for n in acks), 10.0)
        counts = {n: len(acks[n]) for n in acks}
    assert reached, counts
    return counts


# -- whoever answers at the endpoint -------------------------------------------------------


def _grant_of(database: Path) -> tuple[bytes, list[int]]:
    """The grant a writer's endpoint sends, read off its socket as any client could."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10.0)
        sock.connect(f"{database}.mpwriter.sock")
        message, fds, _, _ = socket.recv_fds(sock, 4096, 3)
    assert len(fds) == 3
    return message, fds


def _serve_planted(
    where: Path, uid: int, grant: bytes, state_fd: int, report: int, done: int
) -> None:
    """In a forked child: as ``uid``, listen at ``where`` and answer everyone with
    ``grant``, a request pipe and a registration socket of its own and ``state_fd``;
    once ``done`` closes, report what reached the pipe and the socket."""
    if uid != os.geteuid():
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    request_r, request_w = os.pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(where))
    listener.listen(8)
    os.write(report, b"ready\n")
    answered = 0
    deadline = time.monotonic() + 30.0  # bounded even if the test dies
    while time.monotonic() < deadline:
        readable = select.select([listener, done], [], [], deadline - time.monotonic())[0]
        if done in readable:
            break
        peer, _ = listener.accept()
        with peer:
            try:
                socket.send_fds(peer, [grant], [request_w, theirs.fileno(), state_fd])
                answered += 1
            except OSError:
                pass  # the client hung up without reading: nothing was taken
    os.set_blocking(request_r, False)
    ours.setblocking(False)
    received = []
    for read in (lambda: os.read(request_r, 65536), lambda: ours.recv(65536)):
        try:
            received.append(len(read()))
        except BlockingIOError:
            received.append(0)
    os.write(
        report, f"answered {answered} request {received[0]} registration {received[1]}\n".encode()
    )


@contextlib.contextmanager
def planted_endpoint(
    where: Path, grant: bytes, state_fd: int, uid: int = NOBODY
) -> Iterator[Callable[[], str]]:
    """A socket listening at ``where`` in a child running as ``uid``, answering
    with ``grant``; yields a function that stops it and returns its report."""
    report_r, report_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(report_r)
            os.close(done_w)
            _serve_planted(where, uid, grant, state_fd, report_w, done_r)
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(done_r)
    reports = os.fdopen(report_r, "rb")

    def stop() -> str:
        os.close(done_w)
        assert select.select([reports], [], [], 30.0)[0], "the planted endpoint did not report"
        return reports.readline().decode().strip()

    try:
        assert select.select([reports], [], [], 30.0)[0], "the planted endpoint did not start"
        assert reports.readline() == b"ready\n"
        yield stop
    finally:
        with contextlib.suppress(OSError):
            os.close(done_w)
        reports.close()
        reap_pid(pid)


@pytest.fixture
def sticky_dir() -> Iterator[Path]:
    """A directory like /tmp: anyone may create files in it, only their owner replace them."""
    yield from _scratch_dir(0o1777)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_connect_refuses_an_endpoint_another_user_planted_and_sends_it_nothing(
    tmp_path: Path, sticky_dir: Path
) -> None:
    database = sticky_dir / "app.db"
    database.touch()  # root's database; "nobody" plants its endpoint
    with start_writer(tmp_path / "real.db"):
        grant, fds = _grant_of(tmp_path / "real.db")  # a grant the client could use
    try:
        with planted_endpoint(Path(f"{database}.mpwriter.sock"), grant, fds[2]) as stop:
            before = _descriptors()
            with pytest.raises(mpwriter.UntrustedFile, match="uid 65534") as caught:
                mpwriter.connect(database)
            assert _descriptors() - before == set()  # no descriptor taken from it
            assert "Nothing was sent" in str(caught.value)
            report = stop()
    finally:
        for fd in fds:
            os.close(fd)
    assert report.endswith("request 0 registration 0"), report


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_socket_another_user_planted_does_not_keep_a_sqlite_writer_from_starting(
    sticky_dir: Path,
) -> None:
    database = sticky_dir / "app.db"
    endpoint = Path(f"{database}.mpwriter.sock")
    with planted_endpoint(endpoint, b"", -1) as stop:
        # Live and answering: still replaced, the writer holding the database's lock.
        with start_writer(database):
            assert endpoint.lstat().st_uid == 0
            mpwriter.connect(database).execute(INSERT, (1, 0))
        stop()
    assert rows_by_client(database)[1] == [0]


def test_start_or_connect_is_not_kept_from_starting_by_a_planted_socket(
    sticky_dir: Path,
) -> None:
    database = sticky_dir / "app.db"
    endpoint = Path(f"{database}.mpwriter.sock")
    with planted_endpoint(endpoint, b"", -1) as stop:
        # connect() refuses the plant; starting a writer here replaces it.
        with mpwriter.start_or_connect(
            database, init=LOG_TABLE, context="fork", timeout=10.0
        ) as writer:
            assert endpoint.lstat().st_uid == 0
            writer.execute(INSERT, (1, 0))
        stop()
    assert rows_by_client(database)[1] == [0]


def _start_and_tell(database: Path) -> str:
    try:
        mpwriter.start(database, context="fork").close()
    except mpwriter.Error as exc:
        return f"{type(exc).__name__} {isinstance(exc, PermissionError)} {exc}"
    return "started"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_writer_that_may_not_replace_another_users_socket_says_so(sticky_dir: Path) -> None:
    database = sticky_dir / "app.db"
    endpoint = Path(f"{database}.mpwriter.sock")
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    planted.bind(str(endpoint))  # root's, in a sticky directory: "nobody" may not replace it
    planted.close()
    # "nobody" cannot read the interpreter's library under /root: what the
    # start needs is loaded here first.
    codecs.lookup("ascii")  # the writer reads /proc/locks as ASCII
    start_writer(sticky_dir / "warm.db").close()
    with as_nobody(lambda: _start_and_tell(database)) as outcome:
        pass
    assert outcome.startswith("UntrustedFile True"), outcome
    assert str(endpoint) in outcome
    assert "belongs to uid 0" in outcome
    assert endpoint.lstat().st_uid == 0


def _serve_once(listener: socket.socket, message: bytes, fds: list[int]) -> None:
    peer, _ = listener.accept()
    with peer:
        socket.send_fds(peer, [message], fds)


def assert_refused_keeping_nothing(tmp_path: Path, grant: bytes, fds: list[int]) -> None:
    """connect() to an endpoint of this user answering ``grant`` with ``fds`` raises
    WriterUnavailable and leaves this process no descriptor more."""
    endpoint = tmp_path / "fake.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(endpoint))
        listener.listen(1)
        listener.settimeout(10.0)
        before = _descriptors()
        server = threading.Thread(target=_serve_once, args=(listener, grant, fds))
        server.start()
        with pytest.raises(mpwriter.WriterUnavailable, match="cannot use"):
            mpwriter.connect(tmp_path / "app.db", endpoint=endpoint)
        server.join(10.0)
        assert not server.is_alive()
        assert _descriptors() - before == set()


@pytest.mark.parametrize(
    "grant",
    [
        b'G{"path": "app.db", "timeout": 1.0}',  # a key missing
        b"G[1, 2, 3]",  # not an object
        b'G{"path": 1, "timeout": 1.0, "frame_key": 1}',  # a field of the wrong type
        b"G\xff",  # not even text
        b'G{"path": "app.db", "timeout": 1.0, "frame_key": 1}',  # descriptors of no use
    ],
    ids=["missing-key", "not-an-object", "wrong-type", "not-text", "unusable-descriptors"],
)
def test_a_malformed_grant_raises_writer_unavailable_and_keeps_no_descriptor(
    tmp_path: Path, grant: bytes
) -> None:
    request_r, request_w = os.pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # A pipe where the state should be.
        assert_refused_keeping_nothing(tmp_path, grant, [request_w, theirs.fileno(), request_r])
    finally:
        for end in (request_r, request_w):
            os.close(end)
        ours.close()
        theirs.close()


def test_a_grant_whose_descriptors_cannot_be_used_keeps_none_of_them(tmp_path: Path) -> None:
    with start_writer(tmp_path / "real.db"):
        grant, real = _grant_of(tmp_path / "real.db")
    size = os.fstat(real[2]).st_size
    for fd in real:
        os.close(fd)
    state = tmp_path / "state"
    state.write_bytes(bytes(size))
    request_r, request_w = os.pipe()
    read_only = os.open(state, os.O_RDONLY)  # of the state's size, but cannot be mapped
    try:
        # A pipe where the registration socket should be, too.
        assert_refused_keeping_nothing(tmp_path, grant, [request_w, request_r, read_only])
    finally:
        for fd in (request_r, request_w, read_only):
            os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_users_live_socket_at_a_postgresql_endpoint_is_replaced(
    pg_fresh: str, sticky_dir: Path
) -> None:
    endpoint = sticky_dir / "pg.sock"
    with planted_endpoint(endpoint, b"", -1) as stop:
        # It answers, but it is no writer of this user's: not "in use".
        with mpwriter.start(pg_fresh, init=LOG_TABLE, context="fork", endpoint=endpoint):
            assert endpoint.lstat().st_uid == 0
            mpwriter.connect(pg_fresh, endpoint=endpoint).execute(INSERT, (1, 0))
        stop()
