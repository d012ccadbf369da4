"""gevent: every wait of a blocking call yields to the hub once select is patched.

A forked child patches ``select`` with gevent (as a gunicorn gevent worker
does after its fork), runs a ticker greenlet, and makes one blocking call
that must wait at a given point until its timeout. If the wait blocked the
process instead of parking the greenlet, the ticker could not tick. The last
test has the re-registration after a writer restart wait on a full side
socket.
"""

from __future__ import annotations

import fcntl
import functools
import os
import select
import signal
import struct
import termios
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

import mpwriter
from conftest import SCHEMA, Gate, reap_pid
from mpwriter import testing

gevent = pytest.importorskip("gevent", reason="gevent is not installed (pip install gevent)")

DEADLINE = 30.0
WAIT = 0.5  # seconds the call waits at its point before its timeout
TICK = 0.01


def _green_call_in_a_child(writer: mpwriter.Writer) -> tuple[str, int]:
    """In a forked child patched by gevent: (the call's outcome, ticks meanwhile)."""
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # gevent's notes about patching late
                import gevent.monkey

                gevent.monkey.patch_select()
            ticks = 0

            def tick() -> None:
                nonlocal ticks
                while True:
                    gevent.sleep(TICK)  # sleep-ok: the ticker measures that the hub runs
                    ticks += 1

            ticker = gevent.spawn(tick)
            gevent.sleep(0)  # sleep-ok: a yield to the hub, so the ticker starts
            outcome: Any
            try:
                outcome = writer.execute("INSERT INTO items(seq) VALUES (1)", timeout=WAIT)
            except mpwriter.Error as exc:
                outcome = exc
            counted = ticks
            ticker.kill()
            os.write(result_w, f"{type(outcome).__name__}:{outcome}|{counted}".encode())
        finally:
            os._exit(0)
    os.close(result_w)
    try:
        assert select.select([result_r], [], [], DEADLINE)[0], "the child did not report"
        report = os.read(result_r, 1000).decode()
    finally:
        os.close(result_r)
        reap_pid(pid)
    outcome, ticks = report.rsplit("|", 1)
    return outcome, int(ticks)


def test_waiting_for_the_reply_yields_to_the_hub(writer: mpwriter.Writer, gate: Gate) -> None:
    gate.hold(writer)
    outcome, ticks = _green_call_in_a_child(writer)
    assert outcome.startswith("Timeout:")
    assert ticks >= 10, f"the ticker ran {ticks} times in {WAIT} s: the wait blocked the hub"


def test_waiting_for_room_in_the_queue_yields_to_the_hub(db_path: Path, gate: Gate) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork", queue_size=4096) as writer:
        gate.hold(writer)
        for seq in range(10_000):
            if not writer.post("INSERT INTO items(client, seq) VALUES (1, ?)", (seq,)):
                break
        outcome, ticks = _green_call_in_a_child(writer)
        gate.release()
        assert outcome.startswith("QueueFull:"), outcome
        assert "request queue" in outcome
        assert ticks >= 10, f"the ticker ran {ticks} times in {WAIT} s: the wait blocked the hub"


def test_waiting_for_room_on_the_side_socket_yields_to_the_hub(
    writer: mpwriter.Writer, gate: Gate
) -> None:
    gate.hold(writer)
    for _ in range(10_000):
        try:
            writer.submit("SELECT 1", timeout=0.05)
        except mpwriter.QueueFull:
            break
    outcome, ticks = _green_call_in_a_child(writer)
    assert outcome.startswith("QueueFull:"), outcome
    assert "side socket" in outcome
    assert ticks >= 10, f"the ticker ran {ticks} times in {WAIT} s: the wait blocked the hub"


SUCCESSOR_DELAY = 0.5  # seconds a restarted writer takes to start (its init)


def init_slow_successor(marker: str, conn: Any) -> None:
    """The writers' init: the schema, then, once ``marker`` exists (the test
    made it before killing the first writer), a slow start."""
    conn.executescript(SCHEMA)
    if os.path.exists(marker):
        select.select([], [], [], SUCCESSOR_DELAY)  # sleep-ok: the slow restart under test


def queued_bytes(writer: mpwriter.Writer) -> int:
    """Bytes waiting in the request pipe (FIONREAD on the owner's end)."""
    answer = fcntl.ioctl(writer._link.request_fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", answer)[0])


def test_re_registering_after_a_restart_yields_to_the_hub(tmp_path: Path, gate: Gate) -> None:
    """The child's call waits for its reply; the writer is killed; the child
    sees EOF and must register a new pipe, but the side socket is full until
    the successor (slow to start) reads it. The ticker runs meanwhile, and
    the successor serves the call."""
    marker = str(tmp_path / "slow-successor")
    init = functools.partial(init_slow_successor, marker)
    with mpwriter.start(tmp_path / "app.db", init=init, context="fork", timeout=20.0) as writer:
        victim = writer.stats()["pid"]
        result_r, result_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    import gevent.monkey

                    gevent.monkey.patch_select()
                # Pools a pipe that the first writer holds (one in flight in
                # the side socket would go to the successor: no EOF).
                writer.execute("INSERT INTO items(seq) VALUES (6)")
                os.write(result_w, b"!")
                assert select.select([go_r], [], [], DEADLINE)[0]  # gevent's select
                ticks = 0
                marks: list[int] = []

                def tick() -> None:
                    nonlocal ticks
                    while True:
                        gevent.sleep(TICK)  # sleep-ok: the ticker measures that the hub runs
                        ticks += 1

                ticker = gevent.spawn(tick)
                hooks = {
                    "before_reregister": lambda: marks.append(ticks),
                    "after_reregister": lambda: marks.append(ticks),
                }
                outcome: Any
                with testing.inject(**hooks):
                    try:
                        outcome = writer.execute("INSERT INTO items(seq) VALUES (7)").rowcount
                    except mpwriter.Error as exc:
                        outcome = exc
                ticker.kill()
                os.write(result_w, f"{outcome!r}|{marks}".encode())
            finally:
                os._exit(0)
        os.close(result_w)
        os.close(go_r)
        try:
            assert select.select([result_r], [], [], DEADLINE)[0], "the child did not warm up"
            assert os.read(result_r, 1) == b"!"
            gate.hold(writer)
            os.write(go_w, b"!")
            end = time.monotonic() + DEADLINE
            while queued_bytes(writer) == 0:  # the child's request is queued
                assert time.monotonic() < end, "the child never sent its request"
                select.select([], [], [], 0.01)  # sleep-ok: paces a poll; asserted above
            for _ in range(10_000):  # fill the side socket behind the held writer
                try:
                    writer.submit("SELECT 1", timeout=0.05)
                except mpwriter.QueueFull:
                    break
            open(marker, "w").close()
            os.kill(victim, signal.SIGKILL)
            assert select.select([result_r], [], [], DEADLINE)[0], "the child did not report"
            report = os.read(result_r, 1000).decode()
        finally:
            os.close(result_r)
            os.close(go_w)
            reap_pid(pid)
        outcome, marks = report.split("|")[:2]
        assert marks != "[]", report
        assert outcome == "1", report
        before, after = (int(mark) for mark in marks.strip("[]").split(", "))
        assert after - before >= 10, f"{after - before} ticks while re-registering: blocked"
