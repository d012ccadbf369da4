"""gevent: every wait of a blocking call yields to the hub once select is patched.

A forked child patches ``select`` with gevent (as a gunicorn gevent worker
does after its fork), runs a ticker greenlet, and makes one blocking call
that must wait at a given point until its timeout. If the wait blocked the
process instead of parking the greenlet, the ticker could not tick. The
re-registration after a writer restart waits on the side socket exactly as
a new registration does (`calls.send_side_message`), so the side-socket case
covers it.
"""

from __future__ import annotations

import os
import select
import warnings
from pathlib import Path
from typing import Any

import pytest

import mpwriter
from conftest import SCHEMA, Gate, reap_pid

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
                    gevent.sleep(TICK)
                    ticks += 1

            ticker = gevent.spawn(tick)
            gevent.sleep(0)  # let it start
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
