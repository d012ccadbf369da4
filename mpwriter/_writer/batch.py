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
import traceback
from typing import Any, NamedTuple

from .._errors import RemoteError, Timeout
from .._wire.frames import REPLY_HEADER_SIZE, Kind, Request, Status, encode_reply

log = logging.getLogger("mpwriter")


class Work(NamedTuple):
    """A request, unpickled, ready to run."""

    request: Request
    deadline: float
    sent_at: float  # the caller's monotonic clock, which is system-wide
    body: tuple[Any, ...]


class Counters:
    """Figures the writer reports through `stats()`; plain ints, one process."""

    def __init__(self) -> None:
        self.requests = 0
        self.batches = 0
        self.commits = 0
        self.errors = 0
        self.retries = 0
        self.refused = 0
        self.expired = 0
        self.replayed_batches = 0
        self.lost_requests = 0
        self.gather_waits = 0
        self.gathered = 0
        self.posts_dropped = 0  # reported by callers with their next post
        # Interactive sessions (session.py): opened, rolled back by the writer
        # (limits, a dead caller, closing), and the requests held while one
        # was open, with the seconds they spent held.
        self.sessions = 0
        self.sessions_expired = 0
        self.session_waits = 0
        self.session_wait_seconds = 0.0
        self.post_errors_by_class: dict[str, int] = {}
        self.errors_by_class: dict[str, int] = {}

    def count_error(self, exc: BaseException) -> None:
        self.errors += 1
        name = type(exc).__qualname__
        self.errors_by_class[name] = self.errors_by_class.get(name, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        figures = dict(vars(self))
        figures["errors_by_class"] = dict(self.errors_by_class)
        figures["post_errors_by_class"] = dict(self.post_errors_by_class)
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


def describe(work: Work) -> str:
    """A short description of a request for logs: its kind and the head of its SQL."""
    kind = Kind(work.request.kind).name.lower()
    head = work.body[0] if work.body and isinstance(work.body[0], str) else ""
    if not head and kind == "call":
        head = getattr(work.body[0], "__qualname__", repr(work.body[0]))
    head = " ".join(str(head).split())
    return f"{kind} {head[:80]}{'...' if len(head) > 80 else ''}".strip()


def expired_reply(work: Work) -> bytes:
    return error_reply(
        work.request.request_id,
        Timeout("the deadline passed before the writer reached this request; not applied"),
    )
