"""Shared fixtures: a database path, a started writer, start methods, reaping."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import mpwriter

# The fault tools (kill_writer.py, kill_tree.py, kill_clients.py) live here
# with the tests, which run their routines; _faults.py is what they share.
from _faults import SCHEMA as SCHEMA

START_METHODS = [
    m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def writer(db_path: Path) -> Iterator[mpwriter.Writer]:
    """A writer on a fresh database with the `items` table, started with fork."""
    handle = mpwriter.start(db_path, init=SCHEMA, timeout=10.0, context="fork")
    try:
        yield handle
    finally:
        handle.close(timeout=10.0)


def count_rows(db_path: Path, table: str = "items") -> int:
    with mpwriter.reader(db_path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def reap_pid(pid: int, timeout: float = 10.0) -> None:
    """Reap a raw os.fork() child with a deadline (SIGKILL past it).

    Waits on a pidfd (Linux >= 5.3), which becomes readable when the child exits.
    """
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked child {pid} did not exit in time")
    finally:
        os.close(pidfd)
    os.waitpid(pid, 0)


# How late a call that ended within its timeout may be seen to return: its
# thread may wait for a core after the reply is read (two shared cores in CI).
# A call answered past its own deadline raises Timeout, which the tests that
# use this check first: the slip is only the scheduler's.
SCHEDULING_SLIP = 0.5

# How soon an event-driven answer (a dead writer's EOF, a state that refuses
# calls) must come for the tests that claim "at once". Such a test gives its
# calls a timeout of several times AT_ONCE + SCHEDULING_SLIP and checks the
# kind of error first: an answer that waited out its timeout would be a
# Timeout, and one that waited for a poll or a restart's back-off, late.
AT_ONCE = 1.0


def rowcounts_or_duplicate(
    futures: Iterable[concurrent.futures.Future[mpwriter.Result]],
    duplicate: type[BaseException],
    *,
    timeout: float,
) -> list[int | str]:
    """Each future's rowcount, in order, or "duplicate" where it raised ``duplicate``."""
    outcomes: list[int | str] = []
    for future in futures:
        try:
            outcomes.append(future.result(timeout=timeout).rowcount)
        except duplicate:
            outcomes.append("duplicate")
    return outcomes


def wait_exited(pid: int, timeout: float = 10.0) -> None:
    """Return once process ``pid`` has exited (a zombie has); fail past ``timeout``.

    For a process that need not be our child (a writer, which its supervisor
    reaps): through a pidfd, as `reap_pid`.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone and reaped already
    try:
        assert select.select([pidfd], [], [], timeout)[0], f"process {pid} still runs"
    finally:
        os.close(pidfd)


def sigkill_and_wait(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL ``pid`` and return once it has exited; fail past ``timeout``.

    Through a pidfd, which stays bound to the process even if another
    process (its supervisor) reaps it and its pid is reused meanwhile.
    """
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        assert select.select([pidfd], [], [], timeout)[0], f"process {pid} survived SIGKILL"
    finally:
        os.close(pidfd)


NOBODY = 65534


@contextlib.contextmanager
def as_nobody(act: Callable[[], str]) -> Iterator[str]:
    """Run ``act`` in a forked child as the user "nobody" (root only); yield what it returns.

    The child keeps what it opened and locked until the block exits; it is
    then released and reaped. An exception in ``act`` is yielded as text.
    """
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(report_r)
            os.close(release_w)
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            try:
                outcome = act()
            except BaseException as exc:  # reported to the test, which asserts on it
                outcome = f"unexpected {type(exc).__name__}: {exc}"
            os.write(report_w, outcome.encode())
            select.select([release_r], [], [], 30.0)  # bounded even if the test dies
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(release_r)
    try:
        assert select.select([report_r], [], [], 30)[0], "the child did not report"
        yield os.read(report_r, 4096).decode()
    finally:
        os.close(release_w)
        os.close(report_r)
        reap_pid(pid)


def hold_writer(conn: Any, entered_path: str, release_path: str) -> str:
    """A `call()` target that keeps the writer loop busy until released."""
    # Non-blocking opens: if the test side is gone, fail instead of hanging.
    entered = os.open(entered_path, os.O_WRONLY | os.O_NONBLOCK)
    os.write(entered, b"!")
    os.close(entered)
    release = os.open(release_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        select.select([release], [], [], 30.0)  # bounded even if the test dies
        return "released"
    finally:
        os.close(release)


class Gate:
    """Holds the writer inside a call() so that requests queue up behind it.

    Two FIFOs, each opened read-write on this side so that no open() blocks:
    the writer signals "entered" on one and waits for a byte on the other.
    """

    def __init__(self, directory: Path) -> None:
        self._entered_path = str(directory / "gate-entered")
        self._release_path = str(directory / "gate-release")
        os.mkfifo(self._entered_path)
        os.mkfifo(self._release_path)
        self._entered = os.open(self._entered_path, os.O_RDWR | os.O_NONBLOCK)
        self._release = os.open(self._release_path, os.O_RDWR | os.O_NONBLOCK)
        self.future: Any = None

    def hold(self, writer: mpwriter.Writer, timeout: float = 10.0) -> None:
        """Return once the writer is inside the gate."""
        import concurrent.futures
        import threading

        self.future = concurrent.futures.Future()

        def run() -> None:
            try:
                self.future.set_result(
                    writer.call(hold_writer, self._entered_path, self._release_path)
                )
            except BaseException as exc:  # reported through the future
                self.future.set_exception(exc)

        threading.Thread(target=run, daemon=True).start()
        if not select.select([self._entered], [], [], timeout)[0]:
            raise AssertionError("the writer did not enter the gate")
        os.read(self._entered, 1)

    def release(self) -> None:
        os.write(self._release, b"!")

    def close(self) -> None:
        os.close(self._entered)
        os.close(self._release)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    g = Gate(tmp_path)
    try:
        yield g
    finally:
        g.release()
        g.close()


# -- PostgreSQL ---------------------------------------------------------------------

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id SERIAL PRIMARY KEY,
    client INTEGER,
    seq INTEGER,
    payload TEXT,
    UNIQUE (client, seq)
);
"""
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def _postgres_problem() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None if a server answers."""
    try:
        import psycopg
    except ImportError:
        return "PostgreSQL tests: psycopg is not installed"
    admin_url = os.environ.get("MPWRITER_TEST_POSTGRES", DEFAULT_POSTGRES)
    try:
        psycopg.connect(admin_url, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        reason = (str(exc).strip().splitlines() or ["?"])[0][:160]
        return f"PostgreSQL tests: no server at {admin_url} ({reason}); set MPWRITER_TEST_POSTGRES"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a server, mark the PostgreSQL tests skipped once, with one reason.

    (Marked at collection, the skips fold into a line per file in the
    summary.) In CI (CI=true) they are left to fail in the `pg_url` fixture.
    """
    needing = [item for item in items if "pg_url" in getattr(item, "fixturenames", ())]
    if not needing or os.environ.get("CI") == "true":
        return
    problem = _postgres_problem()
    if problem is not None:
        for item in needing:
            item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """The URL of a fresh database, created for this test run and dropped after it.

    The server is $MPWRITER_TEST_POSTGRES (default: 127.0.0.1:5432, user
    postgres). Without a server the PostgreSQL tests skip, except in CI
    (CI=true), where a missing server fails them.
    """
    import secrets

    psycopg = pytest.importorskip("psycopg", reason="PostgreSQL tests: psycopg is not installed")
    admin_url = os.environ.get("MPWRITER_TEST_POSTGRES", DEFAULT_POSTGRES)
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        reason = (str(exc).strip().splitlines() or ["?"])[0][:160]
        message = f"PostgreSQL tests: no server at {admin_url} ({reason})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message + "; set MPWRITER_TEST_POSTGRES")
    name = f"mpwriter_test_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield admin_url.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_fresh(pg_url: str) -> str:
    """``pg_url`` with a fresh, empty ``items`` table (and no other tables of the tests)."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
        conn.execute(PG_SCHEMA)
    return pg_url


@pytest.fixture
def pg_writer(pg_fresh: str) -> Iterator[mpwriter.Writer]:
    """A writer on the test database with a fresh ``items`` table, started with fork."""
    handle = mpwriter.start(pg_fresh, init=PG_SCHEMA, timeout=10.0, context="fork")
    try:
        yield handle
    finally:
        handle.close(timeout=10.0)


def pg_count(url: str, table: str = "items") -> int:
    with mpwriter.reader(url) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# -- both engines ------------------------------------------------------------------


@dataclass
class Database:
    """A writer on a fresh ``items`` table of one engine, for tests run over both."""

    engine: str  # "sqlite" or "postgresql"
    target: str  # what `mpwriter.start` was given: a file or a URL
    writer: mpwriter.Writer

    def count(self, table: str = "items") -> int:
        with mpwriter.reader(self.target) as conn:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, db_path: Path) -> Iterator[Database]:
    """The same test over SQLite and PostgreSQL (skipped where no server answers)."""
    if request.param == "sqlite":
        target, schema = str(db_path), SCHEMA
    else:
        target, schema = request.getfixturevalue("pg_fresh"), PG_SCHEMA
    handle = mpwriter.start(target, init=schema, timeout=10.0, context="fork")
    try:
        yield Database(request.param, target, handle)
    finally:
        handle.close(timeout=10.0)


@contextlib.contextmanager
def writer_inbox(**bounds: int) -> Iterator[tuple[Any, Any, Any]]:
    """A writer's `Inbox` and `Outbox`, in this process, for the tests of what
    they hold: yields (inbox, outbox, the callers' end of the side socket).
    The request pipe has nothing queued. ``bounds``: ``handed_over_bytes_max``
    (the inbox's), ``orphan_bytes_max`` (the outbox's)."""
    import socket

    from mpwriter._writer.batch import Counters
    from mpwriter._writer.inbox import Inbox
    from mpwriter._writer.outbox import Outbox

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    request_r, request_w = os.pipe()
    requests = multiprocessing.connection.Connection(request_r)
    outbox = Outbox(select.poll(), **{k: v for k, v in bounds.items() if k.startswith("orphan")})
    handed_over = {k: v for k, v in bounds.items() if k.startswith("handed_over")}
    inbox = Inbox(requests, ours, outbox, Counters(), frame_key=0, batch_limit=64, **handed_over)
    try:
        yield inbox, outbox, theirs
    finally:
        inbox.close()
        outbox.close()
        requests.close()
        os.close(request_w)
        ours.close()
        theirs.close()
