"""The WSGI app that tests/test_gunicorn.py serves with a real gunicorn.

POST /write?client=C&seq=S inserts the row (C, S) through the writer and
answers 200 only once `Writer.execute` has returned, that is once the row is
committed. The insert is idempotent, so a client whose request died with its
worker retries the same (C, S): a row then exists exactly for every id that
got its 200.

GET /writer-pid answers the writer's pid (from `Writer.stats`). GET /hang
writes this worker's pid to the FIFO named by $MPWRITER_TEST_HANG_FIFO, then
blocks until gunicorn's timeout SIGABRTs the worker.

POST /slow?seq=S writes "slow <worker pid>" to the event FIFO
($MPWRITER_TEST_EVENTS), then makes a `call()` that holds the writer for
SLOW_WRITE seconds before it inserts (-1, S). GET /ping answers this worker's
pid without touching the database: under gevent and gthread workers it must
answer at once while the worker's other requests wait on slow writes.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import mpwriter

SCHEMA = """
CREATE TABLE IF NOT EXISTS hits (
    client INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    worker INTEGER NOT NULL,
    PRIMARY KEY (client, seq)
);
"""

INSERT = "INSERT INTO hits(client, seq, worker) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"

HANG_LIMIT = 60.0  # seconds: far beyond the tests' gunicorn --timeout
SLOW_WRITE = 0.5  # seconds one /slow write holds the writer

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/write" and environ["REQUEST_METHOD"] == "POST":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        row = (int(query["client"][0]), int(query["seq"][0]), os.getpid())
        try:
            mpwriter.get_writer().execute(INSERT, row)
        except mpwriter.WriterUnavailable as exc:
            return _respond(
                start_response, "503 Service Unavailable", f"{type(exc).__name__}: {exc}"
            )
        return _respond(start_response, "200 OK", "committed")
    if path == "/slow" and environ["REQUEST_METHOD"] == "POST":
        seq = int(parse_qs(environ.get("QUERY_STRING", ""))["seq"][0])
        _event(f"slow {os.getpid()}")
        mpwriter.get_writer().call(slow_insert, seq, os.getpid())
        return _respond(start_response, "200 OK", str(os.getpid()))
    if path == "/ping":
        return _respond(start_response, "200 OK", str(os.getpid()))
    if path == "/writer-pid":
        return _respond(start_response, "200 OK", str(mpwriter.get_writer().stats()["pid"]))
    if path == "/hang":
        fifo = os.open(os.environ["MPWRITER_TEST_HANG_FIFO"], os.O_WRONLY | os.O_NONBLOCK)
        os.write(fifo, f"{os.getpid()}\n".encode())
        os.close(fifo)
        select.select([], [], [], HANG_LIMIT)  # stuck, as a request may be in real life
        return _respond(start_response, "500 Internal Server Error", "was not aborted")
    return _respond(start_response, "404 Not Found", "no such path")


def slow_insert(conn: Any, seq: int, worker: int) -> None:
    """In the writer: hold it for SLOW_WRITE seconds, then insert (-1, seq)."""
    select.select([], [], [], SLOW_WRITE)  # the slow write under test
    conn.execute(INSERT, (-1, seq, worker))


def _event(line: str) -> None:
    # The test holds the FIFO open for reading: this open never blocks, and
    # a line shorter than PIPE_BUF arrives whole.
    fifo = os.open(os.environ["MPWRITER_TEST_EVENTS"], os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fifo, f"{line}\n".encode())
    finally:
        os.close(fifo)


def _respond(start_response: StartResponse, status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
