"""``python -m mpwriter serve PATH``: a writer as a service, reached with `connect`.

The service and its clients run in sessions of their own; the service says
it serves on stderr (its log), and every wait has a deadline.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mpwriter
from connect_client import LOG_TABLE
from test_connect import Client, assert_acked_present_once, clients

__all__ = ["clients"]  # the fixture, shared with test_connect

ROOT = Path(__file__).resolve().parent.parent


class Service:
    """``python -m mpwriter serve`` in a session of its own; its stderr read line by line."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mpwriter", "serve", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
            cwd=cwd,  # `python -m` imports from its working directory, as a service would
        )
        self.lines: list[str] = []
        self._buffer = b""

    def until(self, words: str, timeout: float = 20.0) -> None:
        """Read the log until a line contains ``words``; fail at the deadline or EOF."""
        deadline = time.monotonic() + timeout
        stderr = self.process.stderr
        assert stderr is not None
        while not any(words in line for line in self.lines):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stderr], [], [], left)[0]:
                raise AssertionError(f"the service did not log {words!r}: {self.lines[-5:]}")
            chunk = os.read(stderr.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"the service exited: {self.lines[-5:]}")
            self._buffer += chunk
            *complete, self._buffer = self._buffer.split(b"\n")
            self.lines.extend(line.decode() for line in complete)

    def exit_status(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)  # faulthandler: where it hung
            self.process.wait(10)
            raise

    def rest_of_log(self) -> str:
        assert self.process.stderr is not None
        return (self._buffer + self.process.stderr.read()).decode(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        assert self.process.stderr is not None
        self.process.stderr.close()


@pytest.fixture
def schema(tmp_path: Path) -> str:
    path = tmp_path / "schema.sql"
    path.write_text(LOG_TABLE + ";\n")
    return str(path)


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        service.kill()


@pytest.mark.parametrize("to", ["main", "group"], ids=["sigterm-main", "sigterm-group"])
def test_serve_drains_on_sigterm_with_requests_in_flight_and_exits_0(
    db_path: Path, schema: str, to: str, clients: list[Client], services: list[Service]
) -> None:
    """``group``: systemd's default KillMode signals every process of the service."""
    service = Service(str(db_path), "--init", schema, "--timeout", "10")
    services.append(service)
    service.until("serving")
    clients.extend(Client("keep", db_path, n) for n in range(3))
    for client in clients:
        client.until(lambda c: len(c.acks) >= 20)
    if to == "main":
        service.process.send_signal(signal.SIGTERM)
    else:
        os.killpg(service.process.pid, signal.SIGTERM)
    assert service.exit_status() == 0, service.rest_of_log()
    log = "\n".join(service.lines) + service.rest_of_log()
    assert "stopped" in log
    for client in clients:
        client.stop()
    assert_acked_present_once(db_path, clients)
    assert not os.path.exists(f"{db_path}.mpwriter.sock")


def test_serve_that_cannot_start_exits_non_zero_with_one_line(
    tmp_path: Path, services: list[Service]
) -> None:
    service = Service(str(tmp_path / "missing" / "app.db"))
    services.append(service)
    assert service.exit_status() == 1
    lines = service.rest_of_log().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("mpwriter serve: cannot start"), lines


def test_a_second_serve_of_the_same_file_exits_non_zero_saying_why(
    db_path: Path, schema: str, services: list[Service]
) -> None:
    first = Service(str(db_path), "--init", schema)
    services.append(first)
    first.until("serving")
    second = Service(str(db_path))
    services.append(second)
    assert second.exit_status() == 1
    lines = second.rest_of_log().strip().splitlines()
    assert lines[-1].startswith("mpwriter serve: cannot start"), lines
    assert "already serves" in lines[-1]
    first.process.send_signal(signal.SIGINT)
    assert first.exit_status() == 0


def test_connected_processes_go_on_with_a_new_service_after_the_owner_is_sigkilled(
    db_path: Path, schema: str, clients: list[Client], services: list[Service]
) -> None:
    first = Service(str(db_path), "--init", schema, "--timeout", "10")
    services.append(first)
    first.until("serving")
    clients.extend(Client("keep", db_path, n) for n in range(2))
    for client in clients:
        client.until(lambda c: len(c.acks) >= 20)
    first.process.kill()  # the owner only: its supervisor closes the writer
    for client in clients:
        client.until(lambda c: any("no writer serves" in line for line in c.lines))
    marks = [len(client.acks) for client in clients]
    second = Service(str(db_path), "--init", schema, "--timeout", "10")
    services.append(second)
    second.until("serving")
    for client, mark in zip(clients, marks, strict=True):
        client.until(lambda c, mark=mark: len(c.acks) >= mark + 20)
    for client in clients:
        client.stop()
    second.process.send_signal(signal.SIGTERM)
    assert second.exit_status() == 0
    assert_acked_present_once(db_path, clients)


INIT_MODULE = """
import os

IMPORTED_IN = os.getpid()


def init(conn):
    conn.create_function("shout", 1, lambda text: text.upper() + "!")
    conn.execute("CREATE TABLE IF NOT EXISTS inits(imported_in INTEGER, called_in INTEGER)")
    conn.execute("INSERT INTO inits VALUES (?, ?)", (IMPORTED_IN, os.getpid()))
"""


def test_serve_init_function_is_imported_and_called_in_the_writer(
    tmp_path: Path, services: list[Service]
) -> None:
    (tmp_path / "app_writer.py").write_text(INIT_MODULE)
    db = tmp_path / "app.db"
    service = Service(str(db), "--init-function", "app_writer:init", cwd=tmp_path)
    services.append(service)
    service.until("serving")
    writer = mpwriter.connect(db, timeout=10.0)
    try:
        assert writer.execute("SELECT shout('hi')").rows == [("HI!",)]
        [(imported_in, called_in)] = writer.execute("SELECT * FROM inits").rows
    finally:
        writer.close()
    assert imported_in == called_in
    assert imported_in != service.process.pid  # the service process imported nothing


def test_serve_init_function_gives_a_writer_django_sql_functions(
    db_path: Path, services: list[Service]
) -> None:
    pytest.importorskip("django", reason="Django is not installed")
    service = Service(str(db_path), "--init-function", "mpwriter.django:writer_init")
    services.append(service)
    service.until("serving")
    writer = mpwriter.connect(db_path, timeout=10.0)
    try:
        result = writer.execute("SELECT django_date_extract('year', '2024-05-06')")
    finally:
        writer.close()
    assert result.rows == [(2024,)]


def test_serve_init_function_that_cannot_be_imported_exits_1_naming_it(
    db_path: Path, services: list[Service]
) -> None:
    service = Service(str(db_path), "--init-function", "no_such_module_here:init")
    services.append(service)
    assert service.exit_status() == 1
    lines = service.rest_of_log().strip().splitlines()
    assert lines[-1].startswith("mpwriter serve: cannot start"), lines
    assert "--init-function no_such_module_here:init" in lines[-1]


@pytest.mark.parametrize(
    "args", [["--init-function", "no_colon"], ["--init", "x.sql", "--init-function", "m:f"]]
)
def test_serve_refuses_a_malformed_or_second_init_as_a_usage_error(
    db_path: Path, args: list[str], services: list[Service]
) -> None:
    service = Service(str(db_path), *args)
    services.append(service)
    assert service.exit_status() == 2
    assert "--init" in service.rest_of_log()
