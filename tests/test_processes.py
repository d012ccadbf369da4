"""The handle in other processes: every start method, pools, raw fork, reaping."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import pytest

import mpwriter
from _faults import reap
from conftest import SCHEMA, count_rows, reap_pid, wait_exited


def tag_row(conn: sqlite3.Connection, client: int, seq: int) -> int:
    """A `call()` target: insert a row, return how many rows that client has."""
    conn.execute("INSERT INTO items(client, seq, payload) VALUES (?, ?, 'call')", (client, seq))
    return int(conn.execute("SELECT count(*) FROM items WHERE client = ?", (client,)).fetchone()[0])


def use_every_call(writer: mpwriter.Writer, client: int, report: Connection) -> None:
    """Child process body: each API call once; report what came back."""
    try:
        outcome: dict[str, Any] = {}
        outcome["execute"] = writer.execute(
            "INSERT INTO items(client, seq) VALUES (?, 0) RETURNING seq", (client,)
        ).rows
        outcome["executemany"] = writer.executemany(
            "INSERT INTO items(client, seq) VALUES (?, ?)", [(client, 1), (client, 2)]
        ).rowcount
        writer.executescript(f"INSERT INTO items(client, seq) VALUES ({client}, 3);")
        with writer.transaction() as tx:
            tx.execute("INSERT INTO items(client, seq) VALUES (?, 4)", (client,))
        outcome["call"] = writer.call(tag_row, client, 5)
        outcome["submit"] = (
            writer.submit("INSERT INTO items(client, seq) VALUES (?, 6)", (client,))
            .result(timeout=10)
            .rowcount
        )
        outcome["stats"] = writer.stats()["commits"] > 0
        try:
            writer.execute("INSERT INTO items(client, seq) VALUES (?, 0)", (client,))
        except sqlite3.IntegrityError as exc:
            outcome["error"] = type(exc).__name__
        writer.close()  # a child's close releases its handle, never the writer
        report.send(("ok", outcome))
    except BaseException as exc:
        report.send(("error", repr(exc)))
        raise


def test_every_call_works_from_children_of_each_start_method(
    db_path: Path, start_method: str
) -> None:
    ctx = multiprocessing.get_context(start_method)
    with mpwriter.start(db_path, init=SCHEMA, context=start_method) as writer:
        pipes, children = [], []
        for client in (1, 2):
            receive, send = ctx.Pipe(duplex=False)
            child = ctx.Process(target=use_every_call, args=(writer, client, send))
            child.start()
            send.close()
            pipes.append(receive)
            children.append(child)
        try:
            for receive in pipes:
                assert wait([receive], 60), "child did not report"
                status, outcome = receive.recv()
                assert status == "ok", outcome
                assert outcome["executemany"] == 2
                assert outcome["call"] == 6  # rows 0..5 of that client, in order
                assert outcome["submit"] == 1
                assert outcome["stats"] is True
                assert outcome["error"] == "IntegrityError"
        finally:
            for child in children:
                reap(child)
        # The children closed their handles; the writer still serves the owner.
        assert writer.execute("INSERT INTO items(client, seq) VALUES (0, 0)").rowcount == 1
    assert count_rows(db_path) == 2 * 7 + 1


def cpu_bound_write(n: int) -> int:
    """A pool task: burn some CPU, then write through the attached writer."""
    total = sum(i * i for i in range(20_000 + n))
    writer = mpwriter.get_writer()
    writer.execute(
        "INSERT INTO items(client, seq, payload) VALUES (?, ?, ?)", (os.getpid(), n, str(total))
    )
    return n


def test_process_pool_executor_with_attach(db_path: Path, start_method: str) -> None:
    ctx = multiprocessing.get_context(start_method)
    with (
        mpwriter.start(db_path, init=SCHEMA, context=start_method) as writer,
        concurrent.futures.ProcessPoolExecutor(
            max_workers=2, mp_context=ctx, initializer=mpwriter.attach, initargs=(writer,)
        ) as pool,
    ):
        assert sorted(pool.map(cpu_bound_write, range(40), timeout=60)) == list(range(40))
    assert count_rows(db_path) == 40


def test_multiprocessing_pool_with_attach(db_path: Path, start_method: str) -> None:
    ctx = multiprocessing.get_context(start_method)
    with (
        mpwriter.start(db_path, init=SCHEMA, context=start_method) as writer,
        ctx.Pool(2, initializer=mpwriter.attach, initargs=(writer,)) as pool,
    ):
        result = pool.map_async(cpu_bound_write, range(40))
        assert sorted(result.get(timeout=60)) == list(range(40))
    assert count_rows(db_path) == 40


def test_get_writer_without_attach_is_a_clear_error() -> None:
    code = (
        "import mpwriter\n"
        "try:\n    mpwriter.get_writer()\n"
        "except mpwriter.Error as e:\n    print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "attach" in out.stdout


def identity(value: Any) -> Any:
    return value


def test_a_handle_as_a_task_argument_is_a_clear_error_not_a_hang(writer: mpwriter.Writer) -> None:
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        future = pool.submit(identity, writer)
        with pytest.raises(mpwriter.NotPicklable, match="initializer"):
            future.result(timeout=30)
    with ctx.Pool(1) as pool:
        result = pool.map_async(identity, [writer])
        with pytest.raises(mpwriter.NotPicklable):
            result.get(timeout=30)
    # The writer is unaffected.
    assert writer.execute("INSERT INTO items(payload) VALUES ('fine')").rowcount == 1


def test_forked_child_closes_every_descriptor_its_parents_handle_opened(
    writer: mpwriter.Writer,
) -> None:
    """Reply pipes, and the pipe that wakes the parent's submit() collector:
    a child that kept them would hold them open for as long as it lives."""
    assert writer.submit("INSERT INTO items(client, seq) VALUES (0, 0)").result(timeout=10)
    collector = writer._link.pool.local.collector
    assert collector is not None
    wake_pipe = {collector._wake_r, collector._wake_w}
    inherited = sorted(wake_pipe | {slot.fd for slot in writer._link.pool.local.free})
    receive, send = multiprocessing.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            still_open = []
            for fd in inherited:
                try:
                    os.fstat(fd)
                    still_open.append(fd)
                except OSError:
                    pass
            send.send(still_open)
        finally:
            os._exit(0)
    send.close()
    try:
        assert wait([receive], 30)
        still_open = receive.recv()
    finally:
        reap_pid(pid)
    assert still_open == []


def test_forked_child_never_reads_its_parents_reply_pipes(writer: mpwriter.Writer) -> None:
    # The parent has a pooled reply pipe before the fork...
    assert writer.execute("INSERT INTO items(client, seq) VALUES (0, 0)").rowcount == 1
    receive, send = multiprocessing.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            rows = [
                writer.execute(
                    "INSERT INTO items(client, seq) VALUES (1, ?) RETURNING seq", (n,)
                ).rows
                for n in range(50)
            ]
            send.send(rows)
        finally:
            os._exit(0)
    send.close()
    try:
        # ...and both processes use "it" at once: each must get its own replies.
        mine = [
            writer.execute("INSERT INTO items(client, seq) VALUES (2, ?) RETURNING seq", (n,)).rows
            for n in range(50)
        ]
        assert wait([receive], 30)
        theirs = receive.recv()
    finally:
        reap_pid(pid)
    assert mine == [[(n,)] for n in range(50)]
    assert theirs == [[(n,)] for n in range(50)]


RAW_FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys, mpwriter
    writer = mpwriter.start(sys.argv[1], init="CREATE TABLE t(x)", context=sys.argv[2])
    writer_pid = writer.stats()["pid"]
    for how in ("sys.exit", "exception", "os._exit"):
        pid = os.fork()
        if pid == 0:
            # A gunicorn-style worker: raw os.fork, then a normal interpreter
            # exit that runs atexit and multiprocessing's exit handler.
            writer.execute("INSERT INTO t VALUES (?)", (how,))
            if how == "sys.exit":
                sys.exit(0)
            if how == "exception":
                raise RuntimeError("worker crashed")
            os._exit(0)
        os.waitpid(pid, 0)
        # The writer must be untouched by the worker's exit.
        os.kill(writer_pid, 0)
        assert writer.execute("INSERT INTO t VALUES ('after ' || ?)", (how,)).rowcount == 1
    print(writer.stats()["requests"])
    writer.close()
    """
)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_raw_forked_worker_exit_never_disturbs_the_writer(db_path: Path, context: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", RAW_FORK_SCRIPT, str(db_path), context],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "can only join a child process" not in result.stderr
    assert result.stdout.split()[-1] == "6"
    assert count_rows(db_path, "t") == 6


def steal_exit_status(pid: int) -> None:
    """Try to reap ``pid`` behind mpwriter's back, as gunicorn's master does
    with ``waitpid(-1)``; return once it is dead.

    The writer is the child of mpwriter's supervisor process, not of this
    one: the waitpid fails, and the pidfd waits for the death instead.
    """
    wait_exited(pid)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def test_writer_death_is_seen_even_when_the_owner_reaped_it_itself(db_path: Path) -> None:
    writer = mpwriter.start(db_path, init=SCHEMA, context="fork", restart=False)
    try:
        writer_pid = writer.stats()["pid"]
        os.kill(writer_pid, signal.SIGKILL)
        steal_exit_status(writer_pid)
        # Every later call, each needing a fresh reply pipe, fails the same clear way.
        for _ in range(5):
            with pytest.raises(mpwriter.WriterCrashed, match="not sent"):
                writer.execute("INSERT INTO items(payload) VALUES ('x')", timeout=5)
        with pytest.raises(mpwriter.WriterCrashed):
            writer.stats()
    finally:
        writer.close(timeout=5)


def test_a_reaped_writer_is_still_restarted(db_path: Path) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork") as writer:
        writer_pid = writer.stats()["pid"]
        os.kill(writer_pid, signal.SIGKILL)
        steal_exit_status(writer_pid)
        assert writer.execute("INSERT INTO items(payload) VALUES ('x')").rowcount == 1
        stats = writer.stats()
        assert stats["restarts"] == 1
        assert stats["pid"] != writer_pid


def write_then_report(writer: mpwriter.Writer, report: Connection) -> None:
    writer.execute("INSERT INTO items(payload) VALUES ('from the child')")
    report.send("written")


def test_a_write_returned_in_one_process_is_seen_by_a_reader_in_another(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with mpwriter.reader(db_path) as conn:  # opened before the write
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
        receive, send = multiprocessing.Pipe(duplex=False)
        child = multiprocessing.get_context("fork").Process(
            target=write_then_report, args=(writer, send)
        )
        child.start()
        send.close()
        try:
            assert wait([receive], 30), "the child did not report"
            assert receive.recv() == "written"
        finally:
            reap(child)
        assert conn.execute("SELECT payload FROM items").fetchall() == [("from the child",)]
