"""One behaviour suite over the three ways to call: blocking, futures, asyncio.

The request protocol is written once (`mpwriter._caller.calls`) and run by
three drivers; each test here runs over all three through the public API
(``execute``/``call``, ``submit``/``submit_call``, ``aexecute``/``acall``).
Faults come from real causes: a writer held busy inside a call (`Gate`), a
queue filled with ``post()``, a side socket filled with registrations of new
reply pipes, a writer SIGKILLed -- or through `mpwriter.testing`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

import mpwriter
from conftest import SCHEMA, Gate, count_rows, sigkill_and_wait

INSERT = "INSERT INTO items(client, seq, payload) VALUES (?, ?, ?) RETURNING seq"
DEADLINE = 30.0  # the most any wait of the test itself may take

Call = tuple[str, tuple[Any, ...], dict[str, Any]]  # (blocking method, args, kwargs)


def add_row(conn: Any, client: int, seq: int) -> int:
    """A `call()` target: insert a row, return its seq."""
    conn.execute("INSERT INTO items(client, seq) VALUES (?, ?)", (client, seq))
    return seq


def big_value(conn: Any, size: int) -> bytes:
    """A `call()` target whose reply takes several reads (a pipe holds 64 KiB)."""
    return b"v" * size


class GaveUp(Exception):
    """Raised by a SIGALRM handler into a blocking call: an interruption."""


class Driver:
    """Runs calls named by their blocking method, the way one driver does."""

    name = ""
    futures: ClassVar[dict[str, str]] = {
        "execute": "submit",
        "executemany": "submit_many",
        "executescript": "submit_script",
        "call": "submit_call",
        "call_with_timeout": "submit_call_with_timeout",
    }
    awaitables: ClassVar[dict[str, str]] = {
        "execute": "aexecute",
        "executemany": "aexecutemany",
        "executescript": "aexecutescript",
        "call": "acall",
        "call_with_timeout": "acall_with_timeout",
    }

    def run(self, writer: mpwriter.Writer, calls: list[Call]) -> list[Any]:
        """Run ``calls`` concurrently; each one's result, or the exception it raised."""
        raise NotImplementedError

    def give_up(self, writer: mpwriter.Writer, call: Call, after: float) -> BaseException:
        """Start ``call`` and give up on it after ``after`` seconds, as this
        driver's user would (an interruption, a cancellation, a timeout)."""
        raise NotImplementedError


class Blocking(Driver):
    name = "blocking"

    def run(self, writer: mpwriter.Writer, calls: list[Call]) -> list[Any]:
        outcomes: list[Any] = [None] * len(calls)

        def one(index: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            try:
                outcomes[index] = getattr(writer, method)(*args, **kwargs)
            except BaseException as exc:  # the outcome under test
                outcomes[index] = exc

        threads = [threading.Thread(target=one, args=(i, *call)) for i, call in enumerate(calls)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
            assert not thread.is_alive(), "a blocking call did not end in time"
        return outcomes

    def give_up(self, writer: mpwriter.Writer, call: Call, after: float) -> BaseException:
        def interrupt(signum: int, frame: Any) -> None:
            raise GaveUp

        method, args, kwargs = call
        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, after)
        try:
            getattr(writer, method)(*args, **kwargs)
        except BaseException as exc:  # the outcome under test
            return exc
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        raise AssertionError("the call was not interrupted")


class Futures(Driver):
    name = "futures"

    def run(self, writer: mpwriter.Writer, calls: list[Call]) -> list[Any]:
        submitted: list[Any] = []
        for method, args, kwargs in calls:
            try:
                submitted.append(getattr(writer, self.futures[method])(*args, **kwargs))
            except BaseException as exc:  # not sent: the outcome under test
                submitted.append(exc)
        outcomes: list[Any] = []
        for item in submitted:
            if isinstance(item, BaseException):
                outcomes.append(item)
            else:
                error = item.exception(timeout=DEADLINE)
                outcomes.append(error if error is not None else item.result())
        return outcomes

    def give_up(self, writer: mpwriter.Writer, call: Call, after: float) -> BaseException:
        # A future cannot be cancelled once sent: its user gives up by timeout.
        method, args, kwargs = call
        try:
            future = getattr(writer, self.futures[method])(*args, **{**kwargs, "timeout": after})
        except BaseException as exc:  # the outcome under test
            return exc
        error = future.exception(timeout=DEADLINE)
        assert error is not None, "the call did not time out"
        return error


class Asyncio(Driver):
    name = "asyncio"

    def run(self, writer: mpwriter.Writer, calls: list[Call]) -> list[Any]:
        async def main() -> list[Any]:
            coroutines = [
                getattr(writer, self.awaitables[method])(*args, **kwargs)
                for method, args, kwargs in calls
            ]
            return list(await asyncio.gather(*coroutines, return_exceptions=True))

        return asyncio.run(asyncio.wait_for(main(), DEADLINE))

    def give_up(self, writer: mpwriter.Writer, call: Call, after: float) -> BaseException:
        method, args, kwargs = call

        async def main() -> BaseException:
            coroutine = getattr(writer, self.awaitables[method])(*args, **kwargs)
            try:
                await asyncio.wait_for(coroutine, after)  # cancels it at ``after``
            except BaseException as exc:  # the outcome under test
                return exc
            raise AssertionError("the call was not cancelled")

        return asyncio.run(main())


DRIVERS = [Blocking(), Futures(), Asyncio()]


@pytest.fixture(params=DRIVERS, ids=lambda driver: driver.name)
def driver(request: pytest.FixtureRequest) -> Driver:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def small_queue(db_path: Path) -> Iterator[mpwriter.Writer]:
    """A writer whose request queue holds 4 KiB: a dozen requests fill it."""
    handle = mpwriter.start(db_path, init=SCHEMA, context="fork", queue_size=4096, timeout=10)
    try:
        yield handle
    finally:
        handle.close(timeout=10.0)


def insert(client: int, seq: int, **kwargs: Any) -> Call:
    return ("execute", (INSERT, (client, seq, "x" * 200)), kwargs)


def seq_of(outcome: Any) -> Any:
    return outcome.rows[0][0] if isinstance(outcome, mpwriter.Result) else outcome


def fill_queue(writer: mpwriter.Writer) -> None:
    """Post fire-and-forget writes until the queue is full (the writer is held)."""
    for seq in range(10_000):
        if not writer.post("INSERT INTO items(client, seq) VALUES (99, ?)", (seq,)):
            return
    raise AssertionError("the queue never filled")


def fill_side_socket(writer: mpwriter.Writer) -> list[concurrent.futures.Future[Any]]:
    """Register new reply pipes until the side socket is full (the writer is held).

    Each ``submit`` returns once its pipe is registered and its request sent;
    its future resolves after the gate opens.
    """
    sent = []
    for _ in range(1000):
        try:
            # A small request: the side socket must fill before the queue does.
            sent.append(writer.submit("SELECT 1", timeout=0.05))
        except mpwriter.QueueFull as exc:
            if "side socket" not in str(exc):
                raise
            return sent
    raise AssertionError("the side socket never filled")


# -- the behaviour suite ----------------------------------------------------------


def test_sixty_waiters_on_a_full_queue_behind_a_busy_writer_all_succeed(
    driver: Driver, small_queue: mpwriter.Writer, db_path: Path, gate: Gate
) -> None:
    """Issue 9's "done when": 60 callers, a full 4 KiB queue, a writer busy
    for 1 s, timeout 5 s: every one succeeds. (asyncio used to fail most with
    QueueFull: each waiting task replaced the others' add_writer callback.)
    Every caller also needs a new reply pipe, registered on the side socket,
    which fills after ten: that wait is part of it too."""
    gate.hold(small_queue)
    # sleep-ok: the scenario is a writer busy for one second, not a handshake.
    releaser = threading.Timer(1.0, gate.release)
    releaser.start()
    try:
        outcomes = driver.run(small_queue, [insert(1, n, timeout=5.0) for n in range(60)])
    finally:
        releaser.join(DEADLINE)
    assert [seq_of(outcome) for outcome in outcomes] == list(range(60))
    assert gate.future.result(timeout=DEADLINE) == "released"
    assert count_rows(db_path) == 60


def test_a_full_queue_past_the_timeout_is_queue_full_and_nothing_is_applied(
    driver: Driver, small_queue: mpwriter.Writer, db_path: Path, gate: Gate
) -> None:
    gate.hold(small_queue)
    fill_queue(small_queue)
    outcomes = driver.run(small_queue, [insert(2, n, timeout=0.3) for n in range(3)])
    assert all(isinstance(outcome, mpwriter.QueueFull) for outcome in outcomes), outcomes
    gate.release()
    assert gate.future.result(timeout=DEADLINE) == "released"
    assert [seq_of(o) for o in driver.run(small_queue, [insert(3, 0)])] == [0]
    with mpwriter.reader(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE client = 2").fetchone() == (0,)


def test_no_reply_in_time_is_timeout_and_the_next_call_gets_its_own_reply(
    driver: Driver, writer: mpwriter.Writer, gate: Gate
) -> None:
    gate.hold(writer)
    outcomes = driver.run(writer, [insert(4, n, timeout=0.3) for n in range(3)])
    assert all(isinstance(outcome, mpwriter.Timeout) for outcome in outcomes), outcomes
    gate.release()
    assert gate.future.result(timeout=DEADLINE) == "released"
    # The timed-out requests were sent and are committed late; their replies
    # went to retired pipes, never to these calls.
    outcomes = driver.run(writer, [insert(5, n) for n in range(5)])
    assert [seq_of(outcome) for outcome in outcomes] == list(range(5))
    assert writer.stats()["errors"] == 0


def test_a_full_side_socket_past_the_timeout_is_queue_full_then_it_drains(
    driver: Driver, writer: mpwriter.Writer, gate: Gate
) -> None:
    gate.hold(writer)
    filled = fill_side_socket(writer)
    outcomes = driver.run(writer, [insert(6, n, timeout=0.3) for n in range(3)])
    for outcome in outcomes:
        assert isinstance(outcome, mpwriter.QueueFull), outcomes
        assert "side socket" in str(outcome)
    gate.release()
    assert gate.future.result(timeout=DEADLINE) == "released"
    for future in filled:  # sent with a 0.05 s timeout behind the gate
        assert isinstance(future.exception(timeout=DEADLINE), mpwriter.Timeout)
    outcomes = driver.run(writer, [insert(7, n) for n in range(12)])
    assert [seq_of(outcome) for outcome in outcomes] == list(range(12))


@pytest.mark.parametrize("point", ["side socket", "queue", "reply"])
def test_giving_up_at_each_wait_point_leaves_the_handle_clean(
    driver: Driver,
    db_path: Path,
    gate: Gate,
    point: str,
    request: pytest.FixtureRequest,
) -> None:
    """Interrupted (blocking), cancelled (asyncio) or timed out (futures)
    while waiting for room on the side socket, room in the queue, or the
    reply: the slot is retired or never taken, the handle serves the next
    calls with their own replies, and a request given up before it was sent
    is never applied. (A small queue fills before the side socket does.)"""
    writer: mpwriter.Writer = request.getfixturevalue(
        "small_queue" if point == "queue" else "writer"
    )
    gate.hold(writer)
    if point == "side socket":
        filled = fill_side_socket(writer)
    elif point == "queue":
        fill_queue(writer)
    outcome = driver.give_up(writer, insert(8, 0, timeout=10.0), after=0.3)
    expected: tuple[type[BaseException], ...] = {
        "blocking": (GaveUp,),
        "asyncio": (asyncio.TimeoutError, TimeoutError),
        "futures": (mpwriter.Timeout,) if point == "reply" else (mpwriter.QueueFull,),
    }[driver.name]
    assert isinstance(outcome, expected), repr(outcome)
    gate.release()
    assert gate.future.result(timeout=DEADLINE) == "released"
    if point == "side socket":
        for future in filled:
            future.exception(timeout=DEADLINE)
    outcomes = driver.run(writer, [insert(9, n) for n in range(6)])
    assert [seq_of(outcome) for outcome in outcomes] == list(range(6))
    assert writer.stats()["errors"] == 0
    with mpwriter.reader(db_path) as conn:
        (given_up,) = conn.execute("SELECT count(*) FROM items WHERE client = 8").fetchone()
    # Sent, it is committed once the gate opens -- unless its own deadline
    # (the futures' way to give up) had passed by then: the writer drops it.
    assert given_up == (1 if point == "reply" and driver.name != "futures" else 0)


def test_writer_killed_mid_wait_every_caller_gets_an_honest_outcome(
    driver: Driver, writer: mpwriter.Writer, db_path: Path, gate: Gate
) -> None:
    """SIGKILL the writer while calls wait for it: each either commits (the
    successor served it after the caller re-registered its pipe) or fails
    with WriterCrashed ("outcome unknown"); none hangs; rows match."""
    victim = writer.stats()["pid"]
    gate.hold(writer)
    outcomes: list[Any] = []
    waiting = threading.Thread(
        target=lambda: outcomes.extend(
            driver.run(writer, [insert(10, n, timeout=15.0) for n in range(20)])
        )
    )
    waiting.start()
    # sleep-ok: lets the calls reach their waits; the assertions hold either way.
    select.select([], [], [], 0.3)
    sigkill_and_wait(victim, DEADLINE)
    waiting.join(DEADLINE)
    assert not waiting.is_alive()
    assert len(outcomes) == 20
    for outcome in outcomes:
        assert isinstance(outcome, (mpwriter.Result, mpwriter.WriterCrashed)), repr(outcome)
    committed = [outcome for outcome in outcomes if isinstance(outcome, mpwriter.Result)]
    assert committed, "no waiting call was served by the successor"
    with pytest.raises(mpwriter.WriterCrashed):
        gate.future.result(timeout=DEADLINE)
    assert writer.stats()["pid"] != victim
    with mpwriter.reader(db_path) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM items WHERE client = 10").fetchone()
    assert rows == len(committed)


def test_pooled_pipes_of_a_dead_writer_hit_eof_and_are_registered_again(
    driver: Driver, writer: mpwriter.Writer
) -> None:
    """Pipes pooled while the first writer ran belong to it: after its death
    each call sees EOF, registers a new pipe with the successor, and succeeds."""
    pooled = driver.run(writer, [insert(11, n) for n in range(8)])
    assert [seq_of(outcome) for outcome in pooled] == list(range(8))
    victim = writer.stats()["pid"]
    sigkill_and_wait(victim, DEADLINE)
    outcomes = driver.run(writer, [insert(12, n) for n in range(8)])
    assert [seq_of(outcome) for outcome in outcomes] == list(range(8))
    assert writer.stats()["restarts"] == 1


def test_every_kind_of_call_and_its_timeout(driver: Driver, writer: mpwriter.Writer) -> None:
    """Parity: each blocking method has its future and awaitable twin, with
    the same arguments and ``timeout``."""
    calls: list[Call] = [
        insert(13, 0, timeout=5.0),
        ("executemany", (INSERT.replace(" RETURNING seq", ""), [(13, 1, ""), (13, 2, "")]), {}),
        ("executescript", ("INSERT INTO items(client, seq) VALUES (13, 3);",), {"timeout": 5.0}),
        ("call", (add_row, 13, 4), {}),
        ("call_with_timeout", (5.0, add_row, 13, 5), {}),
    ]
    outcomes = driver.run(writer, calls)
    assert seq_of(outcomes[0]) == 0
    assert outcomes[1].rowcount == 2
    assert outcomes[2:] == [None, 4, 5]
    expired = driver.run(writer, [("call_with_timeout", (0.0, add_row, 13, 6), {})])
    assert isinstance(expired[0], (mpwriter.Timeout, mpwriter.QueueFull)), expired


def test_every_form_of_reply_comes_back_whole_and_alike(
    driver: Driver, writer: mpwriter.Writer
) -> None:
    """A write's compact reply, a pickled one with rows, one too long for
    one read, and a reply after it on the same pooled pipe: each driver
    returns the same values (a compact reply becomes a full `Result`)."""
    calls: list[Call] = [
        ("execute", ("INSERT INTO items(client, seq) VALUES (14, 0)",), {}),
        insert(14, 1),
        ("call", (big_value, 300_000), {}),
    ]
    wrote, returned, big = driver.run(writer, calls)
    assert type(wrote) is mpwriter.Result
    assert (wrote.rowcount, wrote.rows, wrote.columns, wrote.description) == (1, [], None, None)
    assert isinstance(wrote.lastrowid, int)
    assert type(returned) is mpwriter.Result
    assert (returned.rows, returned.columns) == ([(1,)], ("seq",))
    assert big == b"v" * 300_000
    after = driver.run(writer, [insert(14, 2)])
    assert seq_of(after[0]) == 2


# -- lifetimes ---------------------------------------------------------------------


def _threads() -> set[str]:
    return {thread.name for thread in threading.enumerate()}


def _open_fds() -> dict[int, str]:
    """This process's open descriptors, and what each is (for the failure message)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed since
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


def test_closed_handles_that_used_submit_leave_no_thread_and_no_descriptor(
    tmp_path: Path,
) -> None:
    """Issue 9: five handles that used submit(), closed: no collector thread
    and at most one descriptor left behind.

    What the test's handles leave is what is open after and was not before:
    other tests' garbage is collected first (its finalizers would close
    descriptors and end threads meanwhile), and a descriptor or thread of
    theirs ending during the test does not hide one of ours."""
    gc.collect()
    before_fds = _open_fds()
    before_threads = set(threading.enumerate())
    for n in range(5):
        handle = mpwriter.start(tmp_path / f"db{n}.db", init=SCHEMA, context="fork")
        assert handle.submit("INSERT INTO items(seq) VALUES (1)").result(timeout=DEADLINE)
        assert "mpwriter-replies" in _threads()
        handle.close()
        assert "mpwriter-replies" not in _threads()
        del handle
    gc.collect()
    assert set(threading.enumerate()) - before_threads == set()
    left = {fd: what for fd, what in _open_fds().items() if before_fds.get(fd) != what}
    assert len(left) <= 1, left


def test_a_collected_handle_stops_its_collector(writer: mpwriter.Writer) -> None:
    """A handle rebuilt in a spawned child and dropped without close(): its
    collector must not outlive it (the thread holds no reference to it)."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    # In a list, so that the child can drop the only reference it has.
    child = ctx.Process(target=_drop_a_handle_that_used_submit, args=([writer], send))
    child.start()
    send.close()
    try:
        assert receive.poll(DEADLINE), "the child did not report"
        report = receive.recv()
    finally:
        child.join(DEADLINE)
        if child.is_alive():
            child.kill()
            child.join(DEADLINE)
    assert report == (True, False), "collector (while alive, after collection)"


def _drop_a_handle_that_used_submit(holder: list[mpwriter.Writer], send: Any) -> None:
    writer = holder.pop()
    assert writer.submit("INSERT INTO items(seq) VALUES (2)").result(timeout=DEADLINE)
    alive = "mpwriter-replies" in _threads()
    del writer
    gc.collect()
    # The finalizer joins the thread before returning.
    send.send((alive, "mpwriter-replies" in _threads()))


def test_a_forked_child_inherits_no_collector(writer: mpwriter.Writer) -> None:
    """The child of a process whose handle has a running collector starts
    with none, and its own submit() starts its own."""
    assert writer.submit("INSERT INTO items(seq) VALUES (3)").result(timeout=DEADLINE)
    receive_fd, send_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            before = "mpwriter-replies" in _threads()
            ok = writer.submit("INSERT INTO items(seq) VALUES (4)").result(timeout=DEADLINE)
            os.write(send_fd, f"{before} {ok.rowcount}".encode())
        finally:
            os._exit(0)
    os.close(send_fd)
    try:
        assert select.select([receive_fd], [], [], DEADLINE)[0]
        assert os.read(receive_fd, 100) == b"False 1"
    finally:
        os.close(receive_fd)
        os.waitpid(pid, 0)


# -- asyncio: one waiter per descriptor -------------------------------------------


def test_tasks_waiting_on_one_descriptor_all_wake(small_queue: mpwriter.Writer, gate: Gate) -> None:
    """Several tasks wait for room on the shared request pipe at once; when
    one gives up (its timeout), the others keep waiting and all succeed."""
    gate.hold(small_queue)
    fill_queue(small_queue)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        short = asyncio.ensure_future(small_queue.aexecute(*insert(14, 0)[1], timeout=0.2))
        waiting = [
            asyncio.ensure_future(small_queue.aexecute(*insert(15, n)[1], timeout=10.0))
            for n in range(5)
        ]
        with pytest.raises(mpwriter.QueueFull):
            await short
        loop.call_soon_threadsafe(gate.release)
        return [seq_of(result) for result in await asyncio.gather(*waiting)]

    assert asyncio.run(main()) == list(range(5))


# -- futures: the collector never blocks in one wait ---------------------------------


def init_slow_successor(marker: str, delay: float, conn: Any) -> None:
    """The writers' init: the schema, then, once ``marker`` exists, a slow start."""
    conn.executescript(SCHEMA)
    if os.path.exists(marker):
        select.select([], [], [], delay)  # sleep-ok: the slow restart under test


def test_a_future_re_registering_on_a_full_side_socket_holds_up_no_other(
    tmp_path: Path, gate: Gate
) -> None:
    """Two futures' pipes hit EOF (writer killed) and both re-registrations
    wait on a full side socket until the successor, 4 s slow to start, reads
    it. The one whose deadline passes first is resolved then (Timeout), not
    when the socket drains: the collector waits on all of them at once. The
    other is served by the successor."""
    marker = str(tmp_path / "slow-successor")
    init = functools.partial(init_slow_successor, marker, 4.0)
    with mpwriter.start(tmp_path / "app.db", init=init, context="fork", timeout=30.0) as writer:
        victim = writer.stats()["pid"]
        # Three pipes registered with the first writer: each task borrows one
        # before any reply can come back.
        pooled = Asyncio().run(writer, [insert(16, n) for n in range(3)])
        assert [seq_of(outcome) for outcome in pooled] == [0, 1, 2]
        gate.hold(writer)  # takes one of them
        patient = writer.submit(*insert(17, 0)[1], timeout=30.0)
        short = writer.submit(*insert(17, 1)[1], timeout=1.5)
        fill_side_socket(writer)
        open(marker, "w").close()
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        assert isinstance(short.exception(timeout=DEADLINE), mpwriter.Timeout)
        assert time.monotonic() - killed_at < 3.0, "resolved only once the socket drained"
        assert seq_of(patient.result(timeout=DEADLINE)) == 0
