"""Interactive transactions (sessions) in the writer: one at a time, bounded.

A session is a transaction a caller drives statement by statement, each
answered at once (reads included), until it commits or rolls back::

    first request (Kind.SESSION)  -->  the loop finishes the batch before it,
                                       then hands it here (`Sessions.serve`)
    BEGIN IMMEDIATE                -->  the session owns the writer's transaction
    its statements, one by one     -->  run at once, each answered at once;
                                       between them the loop waits, until the
                                       time `serve`/`resume` returned at most
    everyone else's requests       -->  held in the inbox's backlog, in order
    its COMMIT                     -->  its work stays in the open transaction;
                                       the loop's next batch (the held
                                       requests) runs in it and COMMITs: one
                                       group commit for all, the session's
                                       reply sent after it (`settle`)

Why the session owns the transaction rather than sitting beside other
requests under a savepoint: a request held behind it must not wait for its
reply until the session ends (up to its total limit), and a session may read
only what is committed or its own. So the batch before it commits first, and
the requests that came while it was open join its commit.

The held requests are bounded: the loop reads the request pipe while the
held backlog is under `HELD_BATCHES` batches (``max_batch`` requests each),
then stops, so the pipe fills and callers meet its backpressure (`QueueFull`
after their timeout, `post()` drops) as they would without a session. The
session's own next statement may then be behind requests the writer will not
read: once the backlog is at that bound without it and requests wait unread,
the writer rolls the session back ("requests filled the queue behind it").
Each step looks only at the requests that arrived since the last (taking out
the session's own, answering STATS, noting CLOSE), never the whole backlog.

Bounds in time: an idle limit between statements and a total limit (the caller sends
both; each is cut to the owner's ``max_session_seconds``, and one that is not
a number in that range is taken as that maximum), after which the writer
rolls the session back; its caller's reply pipe
is watched (a duplicate of its write end polls POLLERR once every reader is
gone: a killed caller is rolled back at once); a writer that is closing rolls
it back. The caller is not waiting then: its next call on the transaction is
answered `SessionExpired` (the ended transactions are remembered, bounded).

Its statements are vetted as every caller's are, and may also use their own
savepoints (SAVEPOINT, RELEASE, ROLLBACK TO: `SqliteEngine.run_session_statement`);
BEGIN, COMMIT, END and plain ROLLBACK stay refused. Each statement's text
carries `SESSION_SUFFIX`, because sqlite3 caches prepared statements by text
and the authorizer only runs when one is prepared: a "SAVEPOINT a" allowed in
a session must never be found in the cache by a plain request.

Replays: a statement that makes SQLite abandon the transaction (``INSERT OR
ROLLBACK``, a full disk) ends the session: its earlier statements were
answered and cannot be replayed. After its COMMIT, if the batch that carries
it is replayed or its COMMIT fails, the session's work is gone with it, and
its commit is answered `SessionExpired` ("rolled back, not applied"), never
replayed.

PostgreSQL writers answer every session request with `NotSupportedError`.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import sqlite3
import time
from collections import OrderedDict, deque

from .._errors import (
    NotSupportedError,
    SessionExpired,
    StatementRefused,
    WriterCrashed,
)
from .._wire.frames import Kind, Request, SessionOp, Status, encode_reply
from .batch import Counters, Work, error_reply, expired_reply
from .engine import Engine
from .inbox import Inbox
from .outbox import Outbox
from .sqlite import SqliteEngine, deferred_violation
from .sqlite_connection import split_script
from .sqlite_guard import NeedsSolo, Refused

log = logging.getLogger("mpwriter")

SESSION_SUFFIX = "\n/* mpwriter session */"
_SESSION = int(Kind.SESSION)
_STATS = int(Kind.STATS)
_CLOSE = int(Kind.CLOSE)
# While a session is open, the loop holds at most this many batches of other
# requests (and one read of the pipe past it); the rest wait in the pipe.
HELD_BATCHES = 16
# Transactions the writer ended on its own, remembered so that their next
# request is told why (oldest forgotten first).
_ENDED_KEPT = 4096
_SCRIPT = int(SessionOp.SCRIPT)
_COMMIT_OP = int(SessionOp.COMMIT)
_ROLLBACK_OP = int(SessionOp.ROLLBACK)
# The request kind each statement runs as (the engine runs it as a request).
_STATEMENT_KINDS = {
    int(SessionOp.EXECUTE): int(Kind.EXECUTE),
    int(SessionOp.EXECUTEMANY): int(Kind.EXECUTEMANY),
}
_EXECUTE = int(Kind.EXECUTE)
# tuple.__new__ in C: a NamedTuple's own constructor and _replace run Python
# code, and these run for every statement of a session.
_new_tuple = tuple.__new__
# The authorizer's refusals of transaction control start with one of these.
_TRANSACTION_VERBS = frozenset(
    {"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "transaction control"}
)
_REFUSED_HINT = (
    ": Session.commit() and Session.rollback() end the transaction; SAVEPOINT,"
    " RELEASE and ROLLBACK TO work, except on the writer's own savepoints (mpwriter*)"
)

TxnKey = tuple[int, int]  # (sender token, the caller's transaction id)


class _Open:
    """The session being served."""

    __slots__ = (
        "foreign_keys",
        "idle_limit",
        "idle_until",
        "last",
        "pipe",
        "request",
        "started",
        "total_until",
        "txn",
    )

    def __init__(
        self, request: Request, txn: TxnKey, idle_limit: float, total: float, foreign_keys: bool
    ) -> None:
        now = time.monotonic()
        # False: this transaction runs with foreign key enforcement off; it
        # then commits alone and enforcement is back on before anything else.
        self.foreign_keys = foreign_keys
        self.request = request  # its first request: names its sender and slot
        self.txn = txn
        self.idle_limit = idle_limit
        self.idle_until = now + idle_limit
        self.total_until = now + total
        self.pipe = -1  # a duplicate of its reply pipe's write end, watched
        self.started = now
        self.last = now  # when the wait of the requests held behind it was last counted


class Sessions:
    """Serves interactive sessions for the loop; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        counters: Counters,
        inbox: Inbox,
        outbox: Outbox,
        poller: select.poll,
        max_seconds: float = 60.0,
        max_batch: int = 256,
    ) -> None:
        """``poller`` is the writer's poll object: the open session's reply
        pipe is registered on it, so that its caller's death wakes the
        writer's wait (and the writer, finding it none of its own, passes)."""
        self._engine = engine if isinstance(engine, SqliteEngine) else None
        self._max_seconds = max_seconds
        self._held_max = HELD_BATCHES * max_batch
        self._session: _Open | None = None
        # The open session's requests, taken out of the backlog as they arrive.
        self._own: deque[Request] = deque()
        self._seen = 0  # how many backlog requests (from its head) were looked at
        self._closing = False  # a CLOSE request arrived during the session
        # STATS requests that came during the session: the loop answers them after each step.
        self.stats: list[Request] = []
        self._counters = counters
        self._inbox = inbox
        self._outbox = outbox
        self._poller = poller
        self._backlog = inbox.backlog
        self._ended: OrderedDict[TxnKey, str] = OrderedDict()
        # A committed session's request, whose work waits in the open
        # transaction for the next COMMIT; with the counters as they were.
        self._carried: Request | None = None
        self._commits_before = 0
        self._replays_before = 0

    @property
    def carried(self) -> bool:
        """Whether a committed session's work waits in the open transaction."""
        return self._carried is not None

    # -- after a session: its COMMIT ---------------------------------------------

    def settle(self, ran: bool) -> list[tuple[Request, bytes]]:
        """The reply to the carried session commit, once the loop's batch is done.

        ``ran``: the loop ran a batch in the carried transaction (it COMMITted
        or failed); otherwise the transaction is committed here, now.
        """
        request = self._carried
        if request is None:
            return []
        self._carried = None
        self._inbox.session_slot = None  # its last reply: sent by the caller of settle
        if self._engine is not None:
            self._engine.carrying_session = False  # settled, whatever the batch did
        if not ran:
            failed = self._commit_now()
            if failed is not None:
                # Its own COMMIT, shared with no one: its error is the
                # session's (a deferred foreign key violation is an
                # IntegrityError, as sqlite3's commit() raises it).
                self._counters.sessions_expired += 1
                return [(request, error_reply(request.request_id, _told(failed)))]
            committed = True
            why = ""
        else:
            # The batch that ran in the carried transaction committed it with
            # its first COMMIT, or lost it: a replay (a request spoiled the
            # transaction, or a deferred constraint refused the COMMIT: the
            # session's own, perhaps) or a failed COMMIT rolled it back.
            counters = self._counters
            replayed = counters.replayed_batches != self._replays_before
            committed = counters.commits > self._commits_before and not replayed
            why = (
                "the COMMIT it shared was refused or the transaction spoiled (a deferred"
                " constraint, ON CONFLICT ROLLBACK, a full disk)"
            )
        if committed:
            return [(request, encode_reply(request.request_id, Status.OK, None))]
        self._counters.sessions_expired += 1
        expired = SessionExpired(f"the session's transaction was lost: {why}; not applied")
        return [(request, error_reply(request.request_id, expired))]

    def _commit_now(self) -> sqlite3.Error | None:
        """COMMIT the open transaction now; its error (rolled back), or None."""
        engine = self._engine
        assert engine is not None  # only a SQLite session carries work
        return engine.commit_now()

    # -- one session ----------------------------------------------------------------

    def serve(self, first: Request, stopping: bool) -> float | None:
        """Open the session ``first`` belongs to and serve it as far as it goes.

        ``first`` was at the head of the backlog, and no transaction is open;
        ``stopping``: the writer is closing. Returns when to `resume` it at
        the latest (the loop waits for anything until then), or None once
        it ended: committed (its work carried: see `settle`), rolled back,
        or rolled back by the writer. If it committed and no plain request
        is there to share its COMMIT, commits at once.
        """
        key = (first.sender, first.slot)
        self._inbox.session_slot = key  # until its last reply: held, never declared lost
        fd = self._outbox.pipe_of(key)
        if fd is None:
            self._inbox.read_side_socket()  # its registration may be queued there
            fd = self._outbox.pipe_of(key)
        if fd is None:
            # Its caller is gone, or gave up on this request and retired the
            # slot (it waited behind another session past its timeout):
            # opening the session would hold everyone for its idle limit.
            self._counters.expired += 1
            gone = SessionExpired("the session's caller was gone before it began; not applied")
            self._outbox.send(first, error_reply(first.request_id, gone))
            self._inbox.session_slot = None
            return None
        session = self._open(first)
        if session is None:
            self._inbox.session_slot = None
            return None
        self._counters.sessions += 1
        self._session = session
        session.pipe = os.dup(fd)
        self._poller.register(session.pipe, 0)  # POLLERR wakes the wait; the session looks
        self._inbox.hold_requests(self._held_max)
        self._seen = 0
        self._closing = False
        return self._go_on(session, first, stopping)

    def resume(self, stopping: bool) -> float | None:
        """Serve the open session on, after the loop's wait; as `serve` returns."""
        session = self._session
        assert session is not None, "no session is open"
        return self._go_on(session, None, stopping)

    def _go_on(self, session: _Open, request: Request | None, stopping: bool) -> float | None:
        """Run what the session sent until it must wait (its deadline) or ends (None)."""
        counters = self._counters
        ending: str | None = None
        ran = request is not None
        try:
            if request is not None:
                ending = self._statement(session, request)
            while ending is None:
                own = self._take_own(session)
                now = time.monotonic()
                counters.session_wait_seconds += len(self._backlog) * (now - session.last)
                session.last = now
                if own is not None:
                    ending = self._statement(session, own)
                    ran = True
                    continue
                # Its caller's death is looked for only when this step ran
                # nothing: after a statement, the loop's wait (which watches
                # the caller's pipe) wakes at once if the caller is gone, and
                # the next step looks. This spares a poll per statement.
                ending = self._why_end(session, now, stopping, look=not ran)
                if ending is None:
                    return min(session.idle_until, session.total_until)
        except BaseException:
            self._release(session)
            raise
        self._release(session)
        self._finish(session, ending)
        return None

    def _release(self, session: _Open) -> None:
        """What the open session held: the backlog's bound, its own requests, its pipe."""
        self._session = None
        self._inbox.hold_requests(None)
        if self._carried is None:  # else held until `settle` answers it
            self._inbox.session_slot = None
        # Sent on a transaction that ended meanwhile (they are answered as
        # such, first): back at the head, in their order.
        self._backlog.extendleft(reversed(self._own))
        self._own.clear()
        if session.pipe >= 0:
            self._poller.unregister(session.pipe)
            os.close(session.pipe)

    def _finish(self, session: _Open, ending: str) -> None:
        """Count an ended session; end it for good if the writer rolled it back."""
        counters = self._counters
        now = time.monotonic()
        counters.session_wait_seconds += len(self._backlog) * (now - session.last)
        counters.session_waits += len(self._backlog)
        if ending:  # rolled back by the writer: remembered for the caller's next call
            counters.sessions_expired += 1
            self._end(session.txn, ending)
            log.warning(
                "mpwriter: session rolled back after %.3f s: %s", now - session.started, ending
            )
        if not session.foreign_keys:
            self._foreign_keys_on()
        if self._carried is not None and not (self._backlog and self._backlog[0].kind != _SESSION):
            self._outbox.send(*self.settle(ran=False)[0])

    def _open(self, request: Request) -> _Open | None:
        """Open the session ``request`` starts; None if it was answered instead."""
        try:
            deadline, _, body = pickle.loads(request.payload)
            txn_id, first, op, _, idle_limit, total_limit, foreign_keys = body
        except Exception as exc:
            self._counters.count_error(exc)
            self._outbox.send(request, error_reply(request.request_id, exc))
            return None
        txn = (request.sender, txn_id)
        engine = self._engine
        reply: bytes | None = None
        if op == SessionOp.ROLLBACK:
            # Nothing is open: rolled back already (by the writer, or a dead one).
            reply = encode_reply(request.request_id, Status.OK, None)
        elif engine is None:
            reply = error_reply(
                request.request_id,
                NotSupportedError(
                    "interactive sessions need a SQLite writer; on PostgreSQL, send a"
                    " transaction's statements together (Writer.transaction(), Writer.call())"
                ),
            )
        elif txn in self._ended:
            reply = error_reply(request.request_id, SessionExpired(self._ended[txn]))
        elif not first:
            reply = error_reply(
                request.request_id,
                WriterCrashed(
                    "the writer process that held this session's transaction is gone;"
                    " the transaction was rolled back, not committed"
                ),
            )
        elif op == SessionOp.COMMIT:
            # Nothing was opened: whatever the session sent failed before.
            reply = encode_reply(request.request_id, Status.OK, None)
        elif deadline <= time.monotonic():
            self._counters.expired += 1
            work = Work(request, deadline, 0.0, ())
            reply = expired_reply(work)
        if reply is not None:
            self._outbox.send(request, reply)
            return None
        assert engine is not None  # answered NotSupportedError above
        work = Work(request, deadline, 0.0, ())
        if not foreign_keys:
            engine.enforce_foreign_keys(False)
        failed = engine.begin_session(work)
        if failed is not None:
            if not foreign_keys:
                self._foreign_keys_on()
            self._outbox.send(request, failed)  # an outside lock holder stayed
            return None
        idle, total = (
            _bounded(idle_limit, self._max_seconds),
            _bounded(total_limit, self._max_seconds),
        )
        return _Open(request, txn, idle, total, bool(foreign_keys))

    def _foreign_keys_on(self) -> None:
        """Enforcement back on after a session that ran without it, its transaction ended."""
        engine = self._engine
        assert engine is not None
        engine.enforce_foreign_keys(True)

    def _take_own(self, session: _Open) -> Request | None:
        """The session's next request, if it came.

        Looks only at the requests that arrived since the last look (they are
        at the backlog's tail: the loop only appends while a session is open):
        takes the session's own out, answers STATS, notes a CLOSE.
        """
        backlog = self._backlog
        if len(backlog) == self._seen:  # nothing arrived: the usual case, without a list
            return self._own.popleft() if self._own else None
        arrived = [backlog.pop() for _ in range(len(backlog) - self._seen)]
        if arrived:
            key = (session.request.sender, session.request.slot)
            for request in reversed(arrived):
                kind = request.kind
                if kind == _SESSION and (request.sender, request.slot) == key:
                    self._own.append(request)
                elif kind == _STATS:
                    self.stats.append(request)
                else:
                    if kind == _CLOSE:
                        self._closing = True
                    backlog.append(request)
        self._seen = len(backlog)
        return self._own.popleft() if self._own else None

    def _why_end(self, session: _Open, now: float, stopping: bool, look: bool) -> str | None:
        """Why the writer must roll the session back now, if it must; with
        ``look``, whether its caller is gone too."""
        if now >= session.total_until:
            return "the session passed its total limit; its transaction was rolled back"
        if now >= session.idle_until:
            return (
                f"the session sent nothing for its idle limit ({session.idle_limit:g} s);"
                " its transaction was rolled back"
            )
        if stopping or self._closing:
            return "the writer is closing; the session's transaction was rolled back"
        if len(self._backlog) >= self._held_max and self._inbox.queued_bytes():
            # Its next statement, sent or not, can only be behind requests
            # the loop will not read (and the pipe, readable, would wake
            # every wait at once).
            return "requests filled the queue behind it; rolled back, not applied"
        if look and self._caller_gone(session):
            return "the session's caller is gone; its transaction was rolled back"
        return None

    def _caller_gone(self, session: _Open) -> bool:
        poller = select.poll()
        poller.register(session.pipe, 0)  # POLLERR is reported whatever the mask
        return any(events & select.POLLERR for _, events in poller.poll(0))

    def _statement(self, session: _Open, request: Request) -> str | None:
        """Run one of the session's requests and answer it.

        Returns None while the session goes on, "" once it ended as its caller
        asked (commit or rollback), or why the writer rolled it back.
        """
        engine = self._engine
        assert engine is not None
        send = self._outbox.send
        try:
            deadline, sent_at, body = pickle.loads(request.payload)
            txn_id, _, op, args, _, _, _ = body
            if op not in _STATEMENT_KINDS and op not in (_SCRIPT, _COMMIT_OP, _ROLLBACK_OP):
                raise ValueError(f"unknown session operation {op!r}")
            text: str = args[0] + "" if args else ""  # a str, or the request fails here
        except Exception as exc:
            self._counters.count_error(exc)
            send(request, error_reply(request.request_id, exc))
            return None
        if (request.sender, txn_id) != session.txn:
            refused = StatementRefused("another transaction of this session is still open")
            send(request, error_reply(request.request_id, refused))
            return None
        self._counters.requests += 1
        if op in (_COMMIT_OP, _ROLLBACK_OP):
            self._end_as_asked(engine, session, request, op)
            return ""
        stop_at = min(deadline, session.total_until)
        if op == _SCRIPT:
            # Statement by statement, each with the suffix (see the module);
            # like sqlite3's executescript, it stops at the first that fails.
            reply = encode_reply(request.request_id, Status.OK, None)
            as_execute = _new_tuple(Request, (_EXECUTE, *request[1:]))
            for statement in split_script(text):
                body = (statement.strip() + SESSION_SUFFIX, ())
                succeeded, answer = _run(engine, Work(as_execute, stop_at, sent_at, body))
                if not succeeded:
                    reply = answer
                    break
        else:
            as_kind = _new_tuple(Request, (_STATEMENT_KINDS[op], *request[1:]))
            body = (text + SESSION_SUFFIX, args[1])
            _, reply = _run(engine, _new_tuple(Work, (as_kind, stop_at, sent_at, body)))
        send(request, reply)
        session.idle_until = time.monotonic() + session.idle_limit
        if not engine.in_transaction:
            return (
                "SQLite rolled back the whole transaction (ON CONFLICT ROLLBACK, a full"
                " disk or an I/O error); nothing of it was applied"
            )
        return None

    def _end_as_asked(
        self, engine: SqliteEngine, session: _Open, request: Request, op: int
    ) -> None:
        """End the session with its COMMIT or ROLLBACK."""
        send = self._outbox.send
        if op == _ROLLBACK_OP:
            engine.abandon_transaction()
            send(request, encode_reply(request.request_id, Status.OK, None))
        elif not session.foreign_keys:
            # Committed alone, now: the requests held behind it must not run
            # in a transaction without foreign key enforcement.
            failed = self._commit_now()
            if failed is None:
                send(request, encode_reply(request.request_id, Status.OK, None))
            else:
                self._counters.sessions_expired += 1
                send(request, error_reply(request.request_id, _told(failed)))
        else:
            # Carried: answered once the next batch's COMMIT made it durable (`settle`).
            self._carried = request
            engine.carrying_session = True
            self._commits_before = self._counters.commits
            self._replays_before = self._counters.replayed_batches

    def _end(self, txn: TxnKey, why: str) -> None:
        engine = self._engine
        if engine is not None:
            engine.abandon_transaction()
        self._ended[txn] = why
        while len(self._ended) > _ENDED_KEPT:
            self._ended.popitem(last=False)


def _told(error: sqlite3.Error) -> sqlite3.Error:
    """A session's own refused COMMIT, worded to say it was rolled back."""
    if isinstance(error, sqlite3.IntegrityError):
        return deferred_violation(error, "this session's transaction leaves it violated")
    return error


def _bounded(limit: object, most: float) -> float:
    """A limit the caller sent, cut to the owner's maximum.

    A hostile or broken caller may send anything: NaN (which compares
    false with every deadline, so the session would never end), infinity,
    a negative number or not a number at all are taken as the maximum.
    """
    if isinstance(limit, (int, float)) and 0 < limit <= most:
        return float(limit)
    return most


def _run(engine: SqliteEngine, work: Work) -> tuple[bool, bytes]:
    """Run one statement, vetted, as a request of its kind: (succeeded, its reply)."""
    try:
        return True, engine.run_session_statement(work)
    except Refused as refused:
        message = str(refused.args[0])
        verb = message.split(" is refused", 1)[0]
        if verb in _TRANSACTION_VERBS:
            message = f"{verb} is refused in a session{_REFUSED_HINT}"
        return False, engine.fail_now(work, StatementRefused(message))
    except NeedsSolo:
        solo = StatementRefused(
            "this statement cannot run inside a transaction; send it with"
            " Writer.execute(), outside the session"
        )
        return False, engine.fail_now(work, solo)
    except Exception as exc:
        # A session's statement is never replayed: its failure stands.
        return False, engine.fail_now(work, exc)
