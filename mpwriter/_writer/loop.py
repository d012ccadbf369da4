"""The writer process: the one place that writes to the database.

Data flows one way, a module each::

    callers (any process)
      --frames, pipes, payloads-->  inbox.py: the request pipe, reassembled
                                    into a backlog; the side socket's reply
                                    pipes and handed-over payloads; what a
                                    restarted caller awaits
      --> loop.py (here): a batch of up to max_batch requests from the
                          backlog, gathered, run by the engine
      --> engine.py: one transaction, a savepoint each, COMMIT
      --> outbox.py: each reply to the pipe its request named, never blocking
    after the replies: statements that must run alone (VACUUM), each a unit
    with its own deadline, each reply sent as it comes (`Engine.run_alone`);
    an interactive session (session.py), served between batches.

Nothing calls back up that stream: the inbox files pipes in the outbox and
answers there what it knows will never run; a reply the outbox cannot route
yet waits, as data, until the loop has the inbox read the side socket.

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

The loop stops gracefully on a CLOSE request, on SIGTERM, or when its
supervisor closes the lifeline pipe or dies (the pipe reads EOF): it marks
itself closed so that callers fail fast, serves what is already queued,
writes out every reply it owes (however large; a reader that takes nothing
for 5 s is given up), checkpoints and exits.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import select
import signal
import socket
import time
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from .. import testing
from .._wire.frames import Kind, Request, Status, encode_reply
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
from .inbox import Inbox
from .metrics import Latencies, Load, SlowLog
from .outbox import Key, Outbox
from .published import Publisher
from .session import Sessions

log = logging.getLogger("mpwriter")

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
_GATHER_MIN = 50e-6
_GATHER_MAX = 50e-3
_UNCOMMITTED = frozenset((Kind.STATS, Kind.CLOSE))  # a batch of these alone commits nothing
# select() takes a timeout in microseconds (poll's is in milliseconds, too
# coarse for a window of ~100 us), but only descriptors below FD_SETSIZE.
_SELECT_FD_LIMIT = 1024

# Plain ints for the per-request tests: reading a member off the Kind class
# (an enum class attribute) costs many times a comparison of ints.
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


def _wakeup_pipe() -> tuple[int, int]:
    """A non-blocking pipe that signal handlers write to (`signal.set_wakeup_fd`)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    return wake_r, wake_w


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
    """Takes requests from its `Inbox` in batches, runs them through its
    engine, and hands the replies to its `Outbox`."""

    def __init__(self, args: LoopArgs) -> None:
        engine, counters, config, requests, registrations, lifeline, state = args
        self._engine = engine
        self._config = config
        self._lifeline = lifeline  # kept: collecting it would close its descriptor
        self._state = state
        self.counters = counters
        # (sender, slot) of the requests the last batch answered: see `_gather`.
        self._answered: set[Key] = set()
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
        # per wait, on the path every batch takes. The loop's own descriptors
        # have a role; any other it reports belongs to the outbox (a reply
        # pipe with bytes unsent) or to the open session (its caller's pipe).
        self._poller = select.poll()
        self._roles: dict[int, str] = {}
        self._outbox = Outbox(self._poller)
        bound = testing.faults.handed_over_bytes_max
        self._inbox = Inbox(
            requests,
            registrations,
            self._outbox,
            counters,
            frame_key=config.frame_key,
            batch_limit=config.max_batch,
            **({} if bound is None else {"handed_over_bytes_max": bound}),
        )
        self._sessions = Sessions(
            engine,
            counters,
            self._inbox,
            self._outbox,
            self._poller,
            config.max_session_seconds,
            config.max_batch,
        )
        self._watch(self._inbox.request_fd, "requests")
        self._watch(registrations.fileno(), "registrations")
        self._watch(lifeline.fileno(), "lifeline")
        # SIGTERM means "close": the handler only sets a flag, and the wakeup
        # fd makes the poll return (PEP 475 would otherwise resume the wait).
        self._wake_r, self._wake_w = _wakeup_pipe()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._watch(self._wake_r, "signal")
        forks.in_forked_child(self._leave_nothing_to_a_child)

    def _leave_nothing_to_a_child(self) -> None:
        """In a child forked by a call() function: hold nothing of the writer's
        (`forks`), and let SIGTERM end the child, as it would any process."""
        forks.blank(
            [
                self._wake_r,
                self._wake_w,
                *_live_fds(self._lifeline),
                *self._inbox.descriptors(),
                *self._outbox.descriptors(),
            ]
        )
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _watch(self, fd: int, role: str) -> None:
        self._poller.register(fd, select.POLLIN)
        self._roles[fd] = role

    def _on_sigterm(self, _signum: int, _frame: object) -> None:
        self._stopping = True

    # -- main loop ------------------------------------------------------------

    def run(self) -> None:
        inbox = self._inbox
        backlog = inbox.backlog
        self._published.publish(self.figures(), self._stopping)
        while True:
            if self._stopping or inbox.eof:
                self._stopping = True
                self._state.status = CLOSED
                inbox.read_available()
                if not backlog and not inbox.queued_bytes():
                    return
            elif not backlog:
                self._wait()
            elif time.monotonic() >= self._poll_due:
                self._wait(0.0)  # requests in hand: only a look at the other descriptors
            if backlog:
                began, requests = time.monotonic(), self.counters.requests
                self._gather()
                self._serve_batch()
                # The next requests are usually queued by now: read them at
                # once, with no poll first. What this finds is also whether
                # the writer is about to go idle.
                inbox.read_available()
                # Once per batch, after its replies were sent. The last batch
                # before a quiet spell always finds the queue empty, so an idle
                # writer has had its idle tidy before it waits.
                self._engine.tidy(idle=not backlog)
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
                self._inbox.read_available()
            elif role == "registrations":
                self._inbox.read_side_socket()
                if self._inbox.awaited:
                    self._inbox.report_lost()
            elif role == "lifeline":
                self._poller.unregister(fd)
                del self._roles[fd]
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
            else:  # a reply pipe that can take its unsent bytes; or the session's, broken
                self._outbox.flush(fd)

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
        inbox = self._inbox
        backlog = inbox.backlog
        limit = self._config.max_batch
        if (
            window < _GATHER_MIN
            or len(self._answered) < 2
            or len(backlog) >= limit
            or inbox.request_fd >= _SELECT_FD_LIMIT
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
            if remaining <= 0 or not select.select((inbox.request_fd,), (), (), remaining)[0]:
                break
            seen = len(backlog)
            inbox.read_available()
            for request in itertools.islice(backlog, seen, None):
                missing.discard((request.sender, request.slot))
            if not missing or len(backlog) >= limit or inbox.eof:
                break
        self.counters.gathered += len(backlog) - before

    # -- a batch ------------------------------------------------------------------

    def _serve_batch(self) -> None:
        inbox = self._inbox
        outbox = self._outbox
        batch, extra = self._take_batch()
        streams = inbox.attach_streams(batch, extra) if inbox.streams else None
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
        set_aside = len(replies) < len(batch)  # before a carried session's reply joins
        if self._sessions.carried:
            # A session committed into this batch's transaction: answered only now.
            replies += self._sessions.settle(ran=bool(batch))
        committed = time.monotonic()
        outbox.send_all(replies)
        if extra:
            outbox.send_all(extra)
        # Replies to slots whose pipe is not filed yet; routed while the slots
        # are still in hand (a re-registration awaiting one finds it held).
        if outbox.unrouted:
            inbox.route_unrouted()
        if set_aside:
            self._run_alone(batch, replies)
        # The keys in hand become the ones just answered (two sets, swapped:
        # no set is built per batch).
        self._answered, inbox.in_hand = inbox.in_hand, self._answered
        inbox.in_hand.clear()
        if streams:
            inbox.release_streamed(streams)
        if batch:
            self._record_timings(batch, taken, committed)
        backlog = inbox.backlog
        if backlog and backlog[0].kind == _SESSION:
            self._serve_session(backlog.popleft())

    def _take_batch(self) -> tuple[list[Work], list[tuple[Request, bytes]]]:
        """Take up to one batch from the backlog's head, noting each slot in hand.

        Returns the work for the engine, and the replies of what needs no
        engine (STATS, expired, unreadable); a CLOSE only marks the loop.
        Stops before a session's request: it is served alone, once this
        batch is answered (session.py).
        """
        limit = self._config.max_batch
        batch: list[Work] = []
        extra: list[tuple[Request, bytes]] = []
        now = time.monotonic()
        backlog = self._inbox.backlog
        in_hand = self._inbox.in_hand
        loads = pickle.loads
        # The backlog holds about one batch (the inbox reads no more): one
        # count for the loop, not a test of two lengths per request. What
        # needs no engine counts too; it is rare, and the rest waits a batch.
        for _ in range(min(len(backlog), limit)):
            if backlog[0].kind == _SESSION:
                break
            request = backlog.popleft()
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
        return batch, extra

    def _run_alone(self, batch: list[Work], replies: list[tuple[Request, bytes]]) -> None:
        """Run the statements of ``batch`` that must run alone (VACUUM), after
        the batch's ``replies`` went out: each a unit with its own deadline."""
        send = self._outbox.send
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
            # The engine held back the others (PostgreSQL: a request waiting on
            # a lock held outside the writer) so as not to hold the rest: they
            # go back to the head of the backlog and run again in the next
            # batch, with what arrived meanwhile, until answered or expired.
            again = [w.request for w in batch if id(w.request) not in answered]
            if again:
                self._inbox.backlog.extendleft(reversed(again))
                self._inbox.read_available()
        if self._outbox.unrouted:
            self._inbox.route_unrouted()

    def _serve_session(self, first: Request) -> None:
        """Serve the session ``first`` opens, to its end: between its steps,
        wait for anything the loop waits for, until it must go on."""
        sessions = self._sessions
        until = sessions.serve(first, self._stopping or self._inbox.eof)
        while True:
            for request in sessions.stats:
                self._answer_stats(request)
            sessions.stats.clear()
            if self._outbox.unrouted:
                self._inbox.route_unrouted()
            if until is None:
                return
            self._wait(until)
            if time.monotonic() >= self._next_housekeeping:
                self._housekeeping()
            until = sessions.resume(self._stopping or self._inbox.eof)

    def _answer_stats(self, request: Request) -> None:
        """Answer a STATS request now (one that came during a session)."""
        try:
            deadline, sent_at, body = pickle.loads(request.payload)
        except Exception as exc:
            self.counters.count_error(exc)
            self._outbox.send(request, error_reply(request.request_id, exc))
            return
        work = Work(request, deadline, sent_at, body)
        self._outbox.send(request, self._stats_reply(work))

    def _record_timings(self, batch: list[Work], taken: float, committed: float) -> None:
        replied = time.monotonic()
        sent_at = [work.sent_at for work in batch]
        self._latencies.record_batch(sent_at, taken, committed, replied)
        threshold = self._slow.threshold
        if threshold is not None and replied - min(sent_at) >= threshold:
            for work in batch:
                if replied - work.sent_at >= threshold:
                    self._slow.warn(replied - work.sent_at, describe(work))

    # -- figures ------------------------------------------------------------------

    def _stats_reply(self, work: Work) -> bytes:
        return encode_reply(work.request.request_id, Status.OK, self.figures())

    def figures(self) -> Stats:
        """What STATS answers and the published snapshot holds."""
        figures: Any = self.counters.as_dict()
        self._inbox.add_figures(figures)
        self._outbox.add_figures(figures)
        figures["uptime"] = time.monotonic() - self._started
        figures["pid"] = os.getpid()
        figures["restarts"] = self._state.restarts
        # A writer that answers is serving, whatever phase its supervisor has
        # recorded yet; while none serves, stats() raises `WriterCrashed`,
        # whose message says "restarting" or "backing off until ...".
        figures["state"] = "closing" if self._stopping or self._inbox.eof else "running"
        figures["latency_ms"] = self._latencies.summary()
        figures["latency_count"] = self._latencies.count
        figures["latency_sum_seconds"] = self._latencies.sums_seconds()
        figures["busy_seconds"] = self._load.seconds
        figures["busy_share"], figures["requests_per_second"] = self._load.recent()
        stats: Stats = figures
        return stats

    # -- housekeeping -----------------------------------------------------------

    def _housekeeping(self) -> None:
        """Forget reply pipes, payloads and partial requests of callers that are gone."""
        self._next_housekeeping = time.monotonic() + _HOUSEKEEPING_INTERVAL
        if self._published.due():
            self._published.publish(self.figures(), self._stopping)
        self._inbox.housekeeping(time.monotonic() - _PARTIAL_REQUEST_MAX_IDLE)

    def shut_down(self) -> None:
        """Checkpoint and close; called once the loop has returned or failed."""
        if self._stopping:
            self._state.status = CLOSED  # a crash leaves it RUNNING: the owner restarts
        self._published.remove()  # before the engine releases the lock
        try:
            # Every reply of what was committed goes out before the writer
            # exits, however large: its caller is reading it now.
            self._outbox.drain(_DRAIN_REPLY_TIMEOUT)
            self._engine.close()
        finally:
            self._outbox.close()
            self._inbox.close()
