"""The gunicorn recipe on PostgreSQL: a real gunicorn master, its workers, one writer.

tests/gunicorn_conf.py is the README's recipe; here its database is the
test server's URL instead of a file.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import mpwriter

pytest.importorskip("psycopg", reason="PostgreSQL tests: psycopg is not installed")
pytest.importorskip("gunicorn", reason="gunicorn is not installed")

TESTS = Path(__file__).resolve().parent
DEADLINE = 30.0


def _post(port: int, client: int, seq: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        conn.request("POST", f"/write?client={client}&seq={seq}")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_gunicorn_workers_share_one_postgres_writer(pg_url: str, tmp_path: Path) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS hits")
    events = tmp_path / "events.fifo"
    os.mkfifo(events)
    events_fd = os.open(events, os.O_RDWR | os.O_NONBLOCK)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]),
        MPWRITER_TEST_DB=pg_url,
        MPWRITER_TEST_TAKEOVER_TIMEOUT="5",
        MPWRITER_TEST_RESTART="1",
        MPWRITER_TEST_EVENTS=str(events),
        MPWRITER_TEST_HANG_FIFO=str(tmp_path / "unused"),
    )
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as output:
        master = subprocess.Popen(
            [
                sys.executable,
                *("-m", "gunicorn", "--config", str(TESTS / "gunicorn_conf.py")),
                *("--bind", f"127.0.0.1:{port}", "--workers", "3", "--worker-class", "sync"),
                "gunicorn_app:app",
            ],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ready = select.select([events_fd], [], [], DEADLINE)[0]
        assert ready, f"gunicorn did not get ready\n{log.read_text()}"
        assert os.read(events_fd, 100).startswith(b"ready")
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda i: _post(port, i % 6, i), range(120)))
        assert statuses == [200] * 120
        master.send_signal(signal.SIGTERM)
        assert master.wait(DEADLINE) == 0, log.read_text()
    finally:
        if master.poll() is None:
            os.killpg(master.pid, signal.SIGKILL)
            master.wait(DEADLINE)
        os.close(events_fd)
    with mpwriter.reader(pg_url) as conn:
        assert (
            conn.execute("SELECT count(*), count(DISTINCT worker) FROM hits").fetchone()[0] == 120
        )
        connections = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mpwriter'"
            " AND datname = current_database()"
        ).fetchone()[0]
    assert connections == 0  # the writer closed its connection when the master exited
