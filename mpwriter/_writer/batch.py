"""What every engine's group commit shares: requests in hand, replies, counters.

The writer loop hands an engine (`engine.Engine`) every request it has in
hand as `Work`; the engine returns one encoded reply per request, and the loop
sends none of them before the engine returns -- that is, after the COMMIT that
made them durable. (A request the engine must run alone, outside the batch's
transaction, is answered later, by `Engine.run_alone`.) This module holds
what that exchange is made of, for any engine: the unpickled request, the
counters `stats()` reports, how an error becomes a reply, and how a request
is described in a log line.
"""

from __future__ import annotations

import logging
import pickle
import random
import time
import traceback
from collections.abc import Container
from typing import Any, NamedTuple, get_origin, get_type_hints

from .._errors import Interrupted, NotPicklable, RemoteError, StatementRefused, Timeout
from .._wire.frames import REPLY_HEADER_SIZE, Kind, Request, Status, encode_reply, encode_wrote

log = logging.getLogger("mpwriter")

# A request that runs past its deadline is stopped this long before it, so
# that its `Interrupted` ("rolled back, not applied") reaches the caller while
# the caller still waits: at its deadline the caller gives up with `Timeout`
# ("outcome unknown"). Interrupting, rolling back and replying take a few
# milliseconds (the limiter thread waits up to a GIL switch interval, 5 ms,
# to interrupt a busy function). At most this share of the request's timeout,
# so that a short timeout leaves the request most of its time.
STOP_MARGIN = 0.05
STOP_MARGIN_SHARE = 0.1

# A request stops waiting for a lock (SQLite's, held outside the writer; a
# PostgreSQL server that is down or a row lock) this long before its deadline,
# so that the error it is answered with reaches the caller while the caller is
# still listening.
DEADLINE_MARGIN = 0.02

# Kinds whose result is (rowcount, lastrowid, rows[, columns]): without a
# result set, it is sent in the compact form (`encode_wrote`).
WRITE_RESULTS = frozenset({Kind.EXECUTE, Kind.EXECUTEMANY, Kind.POST})
# Kinds that are one SQL statement with its parameters.
SINGLE_STATEMENT = frozenset({Kind.EXECUTE, Kind.POST})
# A plain int for the per-request test: reading a member off the Kind class
# costs many times a comparison of ints.
_POST = int(Kind.POST)


class Work(NamedTuple):
    """A request, unpickled, ready to run."""

    request: Request
    deadline: float
    sent_at: float  # the caller's monotonic clock, which is system-wide
    body: tuple[Any, ...]


class Counters:
    """The figures of `Stats` the loop and the engines count; plain ints, one process.

    Each attribute is the `Stats` figure of the same name and type, where its
    kind and help text are declared (`stats()` returning another key or
    type fails the tests); each starts at zero.
    """

    requests: int
    batches: int
    commits: int
    errors: int
    retries: int
    refused: int
    expired: int
    replayed_batches: int
    lost_requests: int
    gather_waits: int
    gathered: int
    posts_dropped: int  # reported by callers with their next post
    # Interactive sessions (session.py): opened, rolled back by the writer,
    # and the requests held while one was open, with the seconds they waited.
    sessions: int
    sessions_expired: int
    session_waits: int
    session_wait_seconds: float
    post_errors_by_class: dict[str, int]
    errors_by_class: dict[str, int]

    def __init__(self) -> None:
        for name, hint in get_type_hints(Counters).items():
            setattr(self, name, (get_origin(hint) or hint)())  # 0, 0.0 or {}

    def count_error(self, exc: BaseException) -> None:
        self.errors += 1
        name = type(exc).__qualname__
        self.errors_by_class[name] = self.errors_by_class.get(name, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        # Copies: the figures leave while the counts go on.
        figures = {name: dict(v) if isinstance(v, dict) else v for name, v in vars(self).items()}
        figures["mean_batch_size"] = self.requests / self.batches if self.batches else 0.0
        return figures


def commit_cost(average: float, started: float, ended: float) -> float:
    """A moving average of what a COMMIT costs (seconds), with one more sample.

    Engines keep it as `Engine.commit_seconds`; the loop decides from it how
    long a batch may wait for callers about to send (`loop.WriterLoop._gather`).
    Weighted to follow a change (the disk got busy) within a few commits; a
    sample counts for at most twice the average, so that one stalled fsync
    (131 ms seen on the test machine, against 0.3 ms usually) does not make
    the next batches wait that long for late callers.
    """
    sample = ended - started
    if not average:
        return sample  # the first commit
    return average + (min(sample, 2 * average) - average) * 0.25


def stop_time(work: Work, started: float, execution_limit: float | None) -> tuple[float, bool]:
    """When ``work``, starting at ``started``, must stop; and whether its
    execution limit (True) or its deadline (False) decided it.

    The deadline's stop time comes `STOP_MARGIN` before it (see there).
    """
    margin = min(STOP_MARGIN, (work.deadline - work.sent_at) * STOP_MARGIN_SHARE)
    stop_at = work.deadline - max(0.0, margin)
    if execution_limit is not None and started + execution_limit < stop_at:
        return started + execution_limit, True
    return stop_at, False


def interrupted(ran: float, by_execution_limit: bool) -> Interrupted:
    """The error of a request stopped at its stop time (`stop_time`), worded
    by what stopped it."""
    what = "the writer's execution_limit" if by_execution_limit else "its deadline (its timeout)"
    return Interrupted(f"interrupted after {ran:.3f} s at {what}; rolled back, not applied")


def ok_reply(request_id: int, kind: int, value: Any) -> bytes:
    """The OK reply of a request of ``kind`` that returned ``value``.

    Raises `NotPicklable` if ``value`` cannot be pickled (the request must
    then be undone: its reply is an error).
    """
    if kind in WRITE_RESULTS and len(value) == 3:  # no result set
        return encode_wrote(request_id, value[0], value[1])
    try:
        return encode_reply(request_id, Status.OK, value)
    except Exception as exc:
        raise NotPicklable(f"the result could not be pickled: {exc}") from exc


def error_reply(request_id: int, exc: BaseException) -> bytes:
    """Encode an exception with its traceback text; never raises.

    An exception the caller could not rebuild -- it does not pickle, or it
    pickles but its class cannot be unpickled (an ``__init__`` that takes
    other arguments than it passes to ``Exception``) -- is replaced by a
    `RemoteError` that keeps its class name and message: the caller gets the
    error, never a ``TypeError`` from unpickling it. Only errors pay for the
    round trip.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        reply = encode_reply(request_id, Status.ERROR, (exc, tb))
        pickle.loads(memoryview(reply)[REPLY_HEADER_SIZE:])
        return reply
    except BaseException as failure:
        substitute = RemoteError(
            f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
            f" (sent as RemoteError: it could not be rebuilt in the caller:"
            f" {type(failure).__qualname__}: {failure})"
        )
        return encode_reply(request_id, Status.ERROR, (substitute, tb))


def count_failure(counters: Counters, work: Work, exc: BaseException) -> None:
    """Count the error ``work`` is answered with, once its outcome stands.

    A failed post is also logged: nobody waits for its reply, so the log and
    the counts are all there is.
    """
    counters.count_error(exc)
    if isinstance(exc, StatementRefused):
        counters.refused += 1
    if work.request.kind == Kind.POST:
        name = type(exc).__qualname__
        counters.post_errors_by_class[name] = counters.post_errors_by_class.get(name, 0) + 1
        log.warning(
            "mpwriter: fire-and-forget write failed: %s: %s [%s]", name, exc, describe(work)
        )


class Failures:
    """Error replies whose counting waits until their outcome stands.

    A replayed batch runs a request again and may fail it again: an
    attempt's failures are recorded (`fail`), dropped if the attempt does
    not stand (`drop_since` a `mark`), and counted -- and a failed post
    logged -- once they do (`settle`, by `count_failure`).
    """

    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        self._pending: list[tuple[Work, BaseException]] = []

    def fail(self, work: Work, exc: BaseException) -> bytes:
        """``work``'s error reply; ``exc`` is counted at the next `settle`."""
        self._pending.append((work, exc))
        return error_reply(work.request.request_id, exc)

    def answer(self, work: Work, exc: BaseException) -> tuple[Request, bytes]:
        """`fail`, paired with ``work``'s request: as an engine gathers replies."""
        return work.request, self.fail(work, exc)

    def mark(self) -> int:
        """Where the failures of an attempt about to run begin (`drop_since`)."""
        return len(self._pending)

    def drop_since(self, mark: int) -> None:
        """Forget the failures recorded since ``mark``: that attempt does not stand."""
        del self._pending[mark:]

    def keep_only(self, answered: Container[int]) -> None:
        """Forget the failures of requests not in ``answered`` (by ``id``): an
        attempt that broke off recorded them, and its outcome does not stand."""
        self._pending = [item for item in self._pending if id(item[0]) in answered]

    def clear(self) -> None:
        """Forget every failure not settled (they belonged to a run that raised)."""
        self._pending.clear()

    def settle(self) -> None:
        """Count (and log) the failures recorded since the last settling: they stand."""
        pending, self._pending = self._pending, []
        for work, exc in pending:
            count_failure(self._counters, work, exc)


def describe(work: Work) -> str:
    """A short description of a request for logs: its kind and the head of its SQL."""
    kind = Kind(work.request.kind).name.lower()
    head = work.body[0] if work.body and isinstance(work.body[0], str) else ""
    if not head and kind == "call":
        head = getattr(work.body[0], "__qualname__", repr(work.body[0]))
    head = " ".join(str(head).split())
    return f"{kind} {head[:80]}{'...' if len(head) > 80 else ''}".strip()


def count_batch(counters: Counters, batch: list[Work]) -> None:
    """Count a batch an engine was handed, once, however often it runs.

    A replayed batch runs its requests again (and a post's report of the
    posts its caller dropped with it): counting here, before the first
    attempt, keeps the figures right under replay.
    """
    counters.batches += 1
    counters.requests += len(batch)
    for work in batch:
        if work.request.kind == _POST:
            counters.posts_dropped += work.body[2]


def out_of_time(work: Work, now: float) -> bool:
    """Whether ``work`` must stop waiting for a lock now (`DEADLINE_MARGIN`)."""
    return work.deadline - DEADLINE_MARGIN <= now


def back_off(pending: list[Work], delay: float, now: float) -> None:
    """Wait before trying a lock again: ``delay``, jittered by half either way
    so that two waiters do not retry in step, and never past the point where
    the first of ``pending`` must stop waiting (`out_of_time`)."""
    earliest = min(work.deadline for work in pending) - DEADLINE_MARGIN
    time.sleep(max(0.0, min(delay * random.uniform(0.5, 1.5), earliest - now)))


def expired() -> Timeout:
    """The error of a request whose deadline passed before it ran (one wording
    for every engine and the loop)."""
    return Timeout("the deadline passed before the writer reached this request; not applied")


def expired_reply(work: Work) -> bytes:
    return error_reply(work.request.request_id, expired())
