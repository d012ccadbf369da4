"""The writer process: the one place that writes to the database.

Data flow::

    callers (any process)  --frames-->  request pipe (one, shared by all)
    request pipe           -->  writer loop: read every frame at hand, reassemble
    writer loop            -->  group commit: up to max_batch requests, one
                                transaction, a savepoint each (engine.py)
    COMMIT returned        -->  each reply to the reply pipe its request named
                                (reply_pipes.py)
    replies sent           -->  statements that must run alone (VACUUM), each
                                a unit with its own deadline, each reply sent
                                as it comes (`Engine.run_alone`)

- The request pipe is bounded by its kernel capacity (plus at most one batch
  held here): a flood of callers blocks in their own process, with their own
  deadline (QueueFull), instead of growing the writer's memory.
- A batch is capped at ``max_batch`` so one burst cannot stretch the latency
  of the requests at its head without limit.
- Reply pipes reach the writer once per pipe, as file descriptors sent over a
  Unix socket pair (SCM_RIGHTS); a request names its pipe by (sender, slot).
  A bulk request's payload comes the same way, as an anonymous file.
- Replies are written without blocking: a caller that stopped reading (it
  timed out, or was killed) can never stall the writer.

This module is the loop: it reads and reassembles requests, serves them in
batches, answers STATS and shuts down. The side socket, the reply pipes it
brings, and the bookkeeping of restarts below live in `ReplyPipes`.

Restarts: a caller whose reply pipe hit EOF (its writer died) registers a new
pipe for the same slot, naming the request it awaits. If that request is
still queued, this writer serves it and replies on the new pipe. If the reply
was ready before the new pipe arrived, it is kept and sent on arrival. If this
writer has read every byte that was queued when the new pipe arrived without
meeting the request, the dead writer had taken it: the caller is told the
outcome is unknown. The loop tells `ReplyPipes` how far it has read the
request pipe and which slots it holds (`RequestStream`).

The loop stops gracefully on a CLOSE request, on SIGTERM, or when its
supervisor closes the lifeline pipe or dies (the pipe reads EOF): it marks itself closed so that
callers fail fast, serves what is already queued, writes out every reply it
owes (however large; a reader that takes nothing for 5 s is given up),
checkpoints and exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import termios
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from .. import testing
from .._wire.frames import (
    HANDED_OVER,
    STREAMED,
    WHOLE,
    Assembler,
    Frame,
    FrameReader,
    Kind,
    Request,
    Status,
    encode_reply,
    sender_pid,
)
from .._wire.state import CLOSED
from .._wire.stats import Stats
from . import forks
from .batch import (
    Counters,
    Work,
    describe,
    error_reply,
    expired_reply,
)
from .engine import Engine, WriterConfig, open_engine
from .metrics import Latencies, Load, SlowLog
from .published import Publisher
from .reply_pipes import Key, ReplyPipes, StreamedRows, pid_alive
from .session import Sessions

log = logging.getLogger("mpwriter")

_READ_SIZE = 1 << 16
_HOUSEKEEPING_INTERVAL = 1.0
_POLL_INTERVAL = 0.002  # see `WriterLoop._poll_due`
# A request whose next frame has not come for this long was abandoned by a
# live sender (its queue stayed full past its timeout): its pieces are dropped.
_PARTIAL_REQUEST_MAX_IDLE = 300.0
# At shutdown, a reply whose reader takes nothing for this long is dropped
# (its caller stopped reading): the writer still exits in bounded time.
_DRAIN_REPLY_TIMEOUT = 5.0

# Gathering (`WriterLoop._gather`): before a batch runs, the writer may wait
# for the callers it has just answered, so that they share its commit instead
# of paying for the next one. The wait is at most what a commit costs lately
# (`Engine.commit_seconds`: an fsync under synchronous=FULL, a round trip to
# PostgreSQL), so it can at most double a batch's fixed cost while it saves
# one commit for the late callers. Below `_GATHER_MIN` (commits that cost
# next to nothing, as under NORMAL) waiting could only add latency, and the
# writer does not wait at all. `_GATHER_MAX` bounds the wait when a disk
# stalls: the average follows a stall within a few commits, not at once.
# Measured on the 2-core test machine, 3 interleaved pairs of 2 s runs under
# FULL (tools/bench.py): 16 clients 8,517 -> 12,028 writes/s (medians),
# batches 11 -> 15, fairness 0.88 -> 0.96; 8 clients 10,515 -> 9,600 (within
# that run's noise), fairness 0.85 -> 0.97.
_GATHER_MIN = 50e-6
_GATHER_MAX = 50e-3
_UNCOMMITTED = frozenset((Kind.STATS, Kind.CLOSE))  # a batch of these alone commits nothing
# select() takes a timeout in microseconds (poll's is in milliseconds, too
# coarse for a window of ~100 us), but only descriptors below FD_SETSIZE.
_SELECT_FD_LIMIT = 1024

# Plain ints for the per-request tests: reading a member off the Kind class
# costs ~0.3 us on Python 3.11 (an enum class attribute), comparing ints 0.02.
_CLOSE = int(Kind.CLOSE)
_STATS = int(Kind.STATS)
_SESSION = int(Kind.SESSION)
# tuple.__new__ in C, for the per-request tuples: a NamedTuple's own __new__
# is a Python function, a call more per request.
_new_tuple = tuple.__new__


def serve(
    config: WriterConfig,
    requests: Connection,
    registrations: socket.socket,
    lifeline: Connection,
    ready: Connection,
    state: Any,
) -> None:
    """Entry point of the writer process (a `multiprocessing.Process` target)."""
    reset_signals()
    forks.become_writer()
    # Started as a daemonic process (ended with its supervisor), which
    # multiprocessing forbids to have children; a call() function may start
    # one for its own use (`forks` makes the child harmless to the writer).
    multiprocessing.current_process().daemon = False
    # Everything this process inherited (the request pipe, the side socket,
    # the lifeline, its supervisor's sentinel) is already forbidden to a
    # child by `become_writer`; these are named too so that the rule does not
    # hang on how this process was started.
    forks.in_forked_child(lambda: forks.blank(_live_fds(requests, registrations, lifeline, ready)))
    counters = Counters()
    try:
        engine = open_engine(config, counters, state)
    except BaseException as exc:
        forks.leave_if_forked()  # ``init`` may fork
        ready.send(("error", exc))
        return
    forks.leave_if_forked()
    loop = WriterLoop(LoopArgs(engine, counters, config, requests, registrations, lifeline, state))
    state.writer_pid = os.getpid()
    ready.send(("ready", os.getpid()))
    ready.close()
    try:
        loop.run()
    finally:
        loop.shut_down()


def _live_fds(*ends: Connection | socket.socket) -> list[int]:
    """The descriptors of those of ``ends`` still open."""
    fds = []
    for end in ends:
        if isinstance(end, socket.socket):
            fds.append(end.fileno())  # -1 once closed
        elif not end.closed:
            fds.append(end.fileno())
    return fds


def reset_signals() -> None:
    """Own this process's signal handling, whatever the owner had installed.

    Run first by the supervisor and by the writer (both may be forked from
    an app's process). Forked from a gunicorn master, they would otherwise
    run the master's handlers -- which write to the master's wake-up pipe, so
    a signal sent to them would act on the master. Ctrl-C (SIGINT) and a
    closed terminal (SIGHUP) reach the whole process group: the owner
    decides what they mean.
    SIGTERM and SIGALRM get the writer's own handlers later.
    """
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # not settable here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)


class LoopArgs(NamedTuple):
    """What a `WriterLoop` serves with; `serve` gathers them in the writer process."""

    engine: Engine  # opened in this process
    counters: Counters  # the figures the engine and the loop count
    config: WriterConfig
    requests: Connection  # the request pipe's read end
    registrations: socket.socket  # the writer's end of the registration socket
    lifeline: Connection  # a read end whose EOF means "stop"
    state: Any  # shared with the supervisor and the owner


class WriterLoop:
    """Reads requests, runs them in batches, hands replies to `ReplyPipes`.

    It is the `RequestStream` its `ReplyPipes` consults after a restart.
    """

    def __init__(self, args: LoopArgs) -> None:
        engine, counters, config, requests, registrations, lifeline, state = args
        self._engine = engine
        self._config = config
        # The Connection objects are kept, unused, because collecting one
        # closes its descriptor; the loop works on the raw descriptors.
        self._requests = requests
        self._request_fd = requests.fileno()
        os.set_blocking(self._request_fd, False)
        self._lifeline = lifeline
        self._state = state
        self._frames = FrameReader(config.frame_key)
        self._assembler = Assembler()
        self._backlog: deque[Request] = deque()
        # How many requests `_read_available` takes into the backlog: one
        # batch, or `session.HELD_BATCHES` of them while a session holds the others.
        self._read_limit = config.max_batch
        # (sender, request id) -> the rows of a streamed request, until served
        self._streams: dict[tuple[int, int], StreamedRows] = {}
        self.consumed = 0  # bytes read from the request pipe so far
        # (sender, slot) of the requests taken from the backlog and not yet replied to
        self._in_hand: set[Key] = set()
        # (sender, slot) of the requests the last batch answered: see `_gather`.
        self._answered: set[Key] = set()
        self.counters = counters
        self._latencies = Latencies()
        self._load = Load()
        self._slow = SlowLog(config.slow_request)
        self._started = time.monotonic()
        self._stopping = False
        self._next_housekeeping = self._started + _HOUSEKEEPING_INTERVAL
        # While requests keep coming, batches follow one another without a
        # wait: the other descriptors (side socket, lifeline, signals, reply
        # pipes to flush) are still polled at least this often.
        self._poll_due = self._started
        self._published = Publisher(config.path)  # for `python -m mpwriter stats`

        # A plain poll object: the selectors wrapper costs several microseconds
        # per wait, on the path every batch takes.
        self._poller = select.poll()
        self._roles: dict[int, str] = {}
        bound = testing.faults.handed_over_bytes_max
        self._replies = ReplyPipes(
            registrations,
            self.counters,
            self,
            lambda fd: self._watch(fd, "reply", select.POLLOUT),
            self._unwatch,
            **({} if bound is None else {"handed_over_bytes_max": bound}),
        )
        self._sessions = Sessions(
            engine, counters, self, self._backlog, config.max_session_seconds, config.max_batch
        )
        self._watch(self._request_fd, "requests")
        self._watch(registrations.fileno(), "registrations")
        self._watch(lifeline.fileno(), "lifeline")
        # SIGTERM means "close": the handler only sets a flag, and the wakeup
        # fd makes the poll return (PEP 475 would otherwise resume the wait).
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_r = wake_r
        self._wake_w = wake_w
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._watch(wake_r, "signal")
        forks.in_forked_child(self._leave_nothing_to_a_child)

    def _leave_nothing_to_a_child(self) -> None:
        """In a child forked by a call() function: hold nothing of the writer's
        (`forks`), and let SIGTERM end the child, as it would any process."""
        forks.blank(
            [
                self._request_fd,
                self._wake_r,
                self._wake_w,
                *_live_fds(self._lifeline),
                *self._replies.descriptors(),
            ]
        )
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _watch(self, fd: int, role: str, events: int = select.POLLIN) -> None:
        self._poller.register(fd, events)
        self._roles[fd] = role

    def _unwatch(self, fd: int) -> None:
        self._poller.unregister(fd)
        del self._roles[fd]

    def _on_sigterm(self, _signum: int, _frame: object) -> None:
        self._stopping = True

    # -- what ReplyPipes asks of the request stream (RequestStream) -------------

    def queued_bytes(self) -> int:
        """Bytes in the request pipe, not read yet."""
        answer = fcntl.ioctl(self._request_fd, termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", answer)[0])

    def holds(self, key: Key) -> bool:
        """Whether a request from this slot is queued here or being served."""
        return key in self._in_hand or any(
            r.sender == key[0] and r.slot == key[1] for r in self._backlog
        )

    # -- what an interactive session asks of the loop (session.SessionHost) ------

    @property
    def stopping(self) -> bool:
        return self._stopping

    def hold_requests(self, limit: int | None) -> None:
        self._read_limit = self._config.max_batch if limit is None else limit

    def wait_until(self, until: float) -> None:
        self._wait(until)
        if time.monotonic() >= self._next_housekeeping:
            self._housekeeping()

    def send(self, request: Request, reply: bytes) -> None:
        self._replies.send(request, reply)

    def reply_pipe(self, sender: int, slot: int) -> int | None:
        return self._replies.pipe_of((sender, slot))

    def answer_stats(self, request: Request) -> None:
        try:
            deadline, sent_at, body = pickle.loads(request.payload)
        except Exception as exc:
            self.counters.count_error(exc)
            self._replies.send(request, error_reply(request.request_id, exc))
            return
        work = Work(request, deadline, sent_at, body)
        self._replies.send(request, self._stats_reply(work))

    def watch(self, fd: int) -> None:
        self._watch(fd, "session", 0)  # POLLERR wakes the wait; the session looks

    def unwatch(self, fd: int) -> None:
        self._unwatch(fd)

    # -- main loop ------------------------------------------------------------

    def run(self) -> None:
        self._published.publish(self.figures(), self._stopping)
        while True:
            if self._stopping:
                self._state.status = CLOSED
                self._read_available()
                if not self._backlog and not self.queued_bytes():
                    return
            elif not self._backlog:
                self._wait()
            elif time.monotonic() >= self._poll_due:
                self._wait(0.0)  # requests in hand: only a look at the other descriptors
            if self._backlog:
                began, requests = time.monotonic(), self.counters.requests
                self._gather()
                self._serve_batch()
                # The next requests are usually queued by now: read them at
                # once, with no poll first. What this finds is also whether
                # the writer is about to go idle.
                self._read_available()
                # Once per batch, after its replies were sent. The last batch
                # before a quiet spell always finds the queue empty, so an idle
                # writer has had its idle tidy before it waits.
                self._engine.tidy(idle=not self._backlog)
                self._load.served(began, self.counters.requests - requests)
            if time.monotonic() >= self._next_housekeeping:
                self._housekeeping()

    def _wait(self, until: float | None = None) -> None:
        now = time.monotonic()
        self._poll_due = now + _POLL_INTERVAL
        end = self._next_housekeeping
        if until is not None and until < end:  # False for NaN: never a busy loop of poll(0)
            end = until
        timeout = end - now
        # Rounded up, so that poll never returns early; none at all for a look.
        for fd, _ in self._poller.poll(int(timeout * 1000) + 1 if timeout > 0 else 0):
            role = self._roles.get(fd)
            if role == "requests":
                self._read_available()
            elif role == "registrations":
                self._replies.read_side_socket()
                if self._replies.awaited:
                    self._replies.report_lost()
            elif role == "lifeline":
                self._unwatch(fd)
                # The supervisor closes the lifeline when close() found the
                # queue full (the status says CLOSED: nothing to warn about)
                # or when the owner is gone (it logs that itself); or it died.
                if not self._stopping and self._state.status != CLOSED:
                    log.warning(
                        "mpwriter: the writer's supervisor is gone (or stops it because"
                        " its owner is gone); closing"
                    )
                self._stopping = True
            elif role == "signal":
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
            elif role == "reply":
                self._replies.flush(fd)

    def _read_available(self) -> None:
        """Take every request already queued, up to one batch in hand."""
        limit = self._read_limit
        # Empty but after a restart. Never rebound, so a pipe registered while
        # this reads (a handed-over frame reads the side socket) is seen too.
        awaited = self._replies.awaited
        while len(self._backlog) < limit:
            try:
                data = os.read(self._request_fd, _READ_SIZE)
            except BlockingIOError:
                break
            if not data:
                # No write end is left anywhere (rare: a fork-started writer
                # inherits one): nobody can send again.
                self._stopping = True
                break
            drained = len(data) < _READ_SIZE  # then skip the read that finds nothing
            self.consumed += len(data)
            for frame in self._frames.feed(data):
                flags = frame.flags
                request: Request | None
                if flags == WHOLE:  # the usual request: `Assembler.add`'s first case, inlined
                    kind, _, sender, request_id, slot, payload = frame
                    request = _new_tuple(Request, (kind, sender, request_id, slot, payload))
                elif flags & HANDED_OVER:
                    request = self._take_handed_over(frame)
                else:
                    request = self._assembler.add(frame)
                if request is not None:
                    self._backlog.append(request)
                    if awaited:
                        self._replies.arrived(request)
            if drained:
                break
        if awaited:
            self._replies.report_lost()

    def _gather(self) -> None:
        """Wait a little for the callers the last batch answered, to share this commit.

        Callers in a closed loop (a web worker, a job runner) send their next
        request a moment after their reply. When a commit is costly, those
        moments leave them a commit behind the others: under FULL, eight
        such callers settle into two groups of four taking turns, a commit
        each. Waiting for them -- at most what a commit costs, and only for
        callers the last batch answered that have not sent again -- gives
        each commit every caller that is coming.

        Only when the last batch answered two callers or more: callers that
        take turns one at a time (a quiet app, its requests far apart) would
        each wait for one who is not coming back soon, for nothing.
        """
        window = self._engine.commit_seconds
        backlog = self._backlog
        limit = self._config.max_batch
        if (
            window < _GATHER_MIN
            or len(self._answered) < 2
            or len(backlog) >= limit
            or self._request_fd >= _SELECT_FD_LIMIT
        ):
            return
        missing = self._answered.difference([(r.sender, r.slot) for r in backlog])
        if not missing or all(r.kind in _UNCOMMITTED for r in backlog):
            return
        self.counters.gather_waits += 1
        before = len(backlog)
        end = time.monotonic() + min(window, _GATHER_MAX)
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0 or not select.select((self._request_fd,), (), (), remaining)[0]:
                break
            seen = len(backlog)
            self._read_available()
            for request in itertools.islice(backlog, seen, None):
                missing.discard((request.sender, request.slot))
            if not missing or len(backlog) >= limit or self._stopping:
                break
        self.counters.gathered += len(backlog) - before

    def _take_handed_over(self, frame: Frame) -> Request | None:
        """The request whose payload was handed over as a file; None if lost.

        A streamed executemany's rows stay in their file: the request carries
        its head (deadline, sql), and its `StreamedRows` wait in `_streams`
        until the request is served (`_attach_streams`).
        """
        if frame.flags & STREAMED:
            rows = self._replies.take_streamed(frame.sender, frame.request_id)
            if rows is not None:
                self._streams[(frame.sender, frame.request_id)] = rows
                return Request(frame.kind, frame.sender, frame.request_id, frame.slot, rows.head)
            payload = None
        else:
            payload = self._replies.take_payload(frame.sender, frame.request_id)
        if payload is not None:
            return Request(frame.kind, frame.sender, frame.request_id, frame.slot, payload)
        # A writer that died had taken the file (or it was cut short): the
        # request never ran.
        self._replies.answer_lost(
            Request(frame.kind, frame.sender, frame.request_id, frame.slot, b"")
        )
        return None

    def _serve_batch(self) -> None:
        limit = self._config.max_batch
        batch: list[Work] = []
        extra: list[tuple[Request, bytes]] = []
        now = time.monotonic()
        in_hand = self._in_hand
        loads = pickle.loads
        while self._backlog and len(batch) < limit:
            if self._backlog[0].kind == _SESSION:
                break  # served alone, once this batch is answered (session.py)
            request = self._backlog.popleft()
            in_hand.add((request.sender, request.slot))
            kind = request.kind
            if kind == _CLOSE:
                self._stopping = True
                continue
            try:
                deadline, sent_at, body = loads(request.payload)
            except Exception as exc:
                self.counters.count_error(exc)
                extra.append((request, error_reply(request.request_id, exc)))
                continue
            work = _new_tuple(Work, (request, deadline, sent_at, body))
            if kind == _STATS:
                extra.append((request, self._stats_reply(work)))
            elif deadline <= now:
                self.counters.expired += 1
                extra.append((request, expired_reply(work)))
            else:
                batch.append(work)
        streams = self._attach_streams(batch, extra) if self._streams else None
        replies: list[tuple[Request, bytes]] = []
        taken = time.monotonic()
        if batch:
            try:
                replies = self._engine.run(batch)
            except Exception as exc:
                forks.leave_if_forked()
                # Only the writer's own statements can fail here (a ROLLBACK TO
                # on a broken disk): fail this batch, keep serving.
                log.exception("mpwriter: batch failed")
                try:
                    self._engine.abandon_transaction()
                except Exception:
                    log.exception("mpwriter: rolling back the failed batch failed too")
                replies = [(w.request, error_reply(w.request.request_id, exc)) for w in batch]
            # A child forked while the batch ran (by a function it ran: a SQL
            # function a call() registered, say) must not answer it.
            forks.leave_if_forked()
        if self._sessions.carried:
            # A session committed into this batch's transaction: answered only now.
            replies += self._sessions.settle(ran=bool(batch))
        committed = time.monotonic()
        send = self._replies.send
        self._replies.send_all(replies)
        if extra:
            self._replies.send_all(extra)
        if batch and len(replies) < len(batch):
            # Statements that must run alone (VACUUM) come after the batch's
            # replies went out, each a unit with its own deadline.
            answered = {id(request) for request, _ in replies}
            try:
                for request, reply in self._engine.run_alone():
                    answered.add(id(request))
                    send(request, reply)
            except Exception as exc:
                log.exception("mpwriter: a statement run alone failed")
                for work in batch:
                    if id(work.request) not in answered:
                        send(work.request, error_reply(work.request.request_id, exc))
            else:
                self._serve_again([w.request for w in batch if id(w.request) not in answered])
        # The keys in hand become the ones just answered (two sets, swapped:
        # no set is built per batch).
        self._answered, self._in_hand = in_hand, self._answered
        self._in_hand.clear()
        if streams:
            for rows in streams:
                self._replies.release_streamed(rows)
        if batch:
            self._record_timings(batch, taken, committed)
        if self._backlog and self._backlog[0].kind == _SESSION:
            self._sessions.serve(self._backlog.popleft())

    def _serve_again(self, requests: list[Request]) -> None:
        """Put requests the engine left unanswered back at the head of the backlog.

        The engine held them (PostgreSQL: a request waiting on a lock held
        outside the writer) so as not to hold the others: they run again in
        the next batch, with what arrived meanwhile, until answered or expired.
        """
        if not requests:
            return
        self._backlog.extendleft(reversed(requests))
        self._read_available()

    def _attach_streams(
        self, batch: list[Work], extra: list[tuple[Request, bytes]]
    ) -> list[StreamedRows]:
        """Give the streamed requests taken for this batch their rows; return
        the files to release once they are answered.

        Only called while some request is streamed: an ordinary batch pays
        one test per batch, none per request.
        """
        streams = self._streams
        taken: list[StreamedRows] = []
        for index, work in enumerate(batch):
            request = work.request
            rows = streams.pop((request.sender, request.request_id), None)
            if rows is not None:
                batch[index] = work._replace(body=(work.body[0], rows))
                taken.append(rows)
        for request, _ in extra:  # expired, or a head that did not unpickle
            rows = streams.pop((request.sender, request.request_id), None)
            if rows is not None:
                taken.append(rows)
        return taken

    def _record_timings(self, batch: list[Work], taken: float, committed: float) -> None:
        replied = time.monotonic()
        sent_at = [work.sent_at for work in batch]
        self._latencies.record_batch(sent_at, taken, committed, replied)
        threshold = self._slow.threshold
        if threshold is not None and replied - min(sent_at) >= threshold:
            for work in batch:
                if replied - work.sent_at >= threshold:
                    self._slow.warn(replied - work.sent_at, describe(work))

    def _stats_reply(self, work: Work) -> bytes:
        return encode_reply(work.request.request_id, Status.OK, self.figures())

    def figures(self) -> Stats:
        """What STATS answers and the published snapshot holds."""
        figures: Any = self.counters.as_dict()
        figures["queue_depth"] = len(self._backlog) + self._queued_estimate()
        figures["queued_bytes"] = self.queued_bytes()
        figures["reply_pipes"] = self._replies.pipe_count
        figures["uptime"] = time.monotonic() - self._started
        figures["pid"] = os.getpid()
        figures["resync_skipped_bytes"] = self._frames.skipped
        figures["restarts"] = self._state.restarts
        # A writer that answers is serving, whatever phase its supervisor has
        # recorded yet; while none serves, stats() raises `WriterCrashed`,
        # whose message says "restarting" or "backing off until ...".
        figures["state"] = "closing" if self._stopping else "running"
        figures["latency_ms"] = self._latencies.summary()
        figures["latency_count"] = self._latencies.count
        figures["latency_sum_seconds"] = self._latencies.sums_seconds()
        figures["busy_seconds"] = self._load.seconds
        figures["busy_share"], figures["requests_per_second"] = self._load.recent()
        figures["dropped_partial_requests"] = (
            self._assembler.dropped + self._replies.dropped_handovers
        )
        figures["dropped_partial_request_bytes"] = (
            self._assembler.dropped_bytes + self._replies.dropped_handover_bytes
        )
        figures["dropped_orphan_replies"] = self._replies.dropped_orphans
        figures["dropped_orphan_reply_bytes"] = self._replies.dropped_orphan_bytes
        stats: Stats = figures
        return stats

    def _queued_estimate(self) -> int:
        # Requests are typically one frame; a rough count is what a dashboard needs.
        return -(-self.queued_bytes() // 256)

    # -- housekeeping -----------------------------------------------------------

    def _housekeeping(self) -> None:
        """Forget reply pipes, payloads and partial requests of callers that are gone."""
        self._next_housekeeping = time.monotonic() + _HOUSEKEEPING_INTERVAL
        if self._published.due():
            self._published.publish(self.figures(), self._stopping)
        stale = time.monotonic() - _PARTIAL_REQUEST_MAX_IDLE
        self._replies.housekeeping(stale)
        dead = {sender for sender in self._assembler.senders() if not pid_alive(sender_pid(sender))}
        if dead:
            self._assembler.drop_senders(dead)
        self._assembler.drop_stale(stale)

    def shut_down(self) -> None:
        """Checkpoint and close; called once the loop has returned or failed."""
        if self._stopping:
            self._state.status = CLOSED  # a crash leaves it RUNNING: the owner restarts
        self._published.remove()  # before the engine releases the lock
        try:
            # Every reply of what was committed goes out before the writer
            # exits, however large: its caller is reading it now.
            self._replies.drain(_DRAIN_REPLY_TIMEOUT)
            self._engine.close()
        finally:
            self._replies.close()
