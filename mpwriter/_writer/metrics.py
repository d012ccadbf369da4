"""Figures for watching a writer: latency percentiles and the slow-request log.

The writer keeps the timings of its most recent requests (a bounded window,
so memory stays flat) split into queue wait (sent by the caller -> taken by
the writer) and execution (taken -> committed); ``total`` runs until the reply
is written. Callers' and the writer's monotonic clocks are the same
system-wide clock, so the difference is meaningful across processes.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from .._wire.stats import LatencyFigures, LatencySeries, LatencySums

log = logging.getLogger("mpwriter")

_WINDOW = 10_000


class Latencies:
    """The last few thousand requests' timings, in seconds, and running totals."""

    def __init__(self, window: int = _WINDOW) -> None:
        self.queue_wait: deque[float] = deque(maxlen=window)
        self.execution: deque[float] = deque(maxlen=window)
        self.total: deque[float] = deque(maxlen=window)
        # Since the writer started, for a Prometheus summary's _count and _sum.
        self.count = 0
        self.sums = {"queue_wait": 0.0, "execution": 0.0, "total": 0.0}
        # The percentiles sort the whole window (about 1 ms a series): they are
        # reused until a request is recorded, so an idle writer publishing its
        # figures every second does not sort anything.
        self._summary: LatencySeries | None = None

    def record_batch(
        self, sent_at: list[float], taken: float, committed: float, replied: float
    ) -> None:
        """Record one batch: its requests' send times; when it was taken,
        committed, and its replies written."""
        self.queue_wait.extend([taken - sent for sent in sent_at])
        self.execution.extend([committed - taken] * len(sent_at))
        self.total.extend([replied - sent for sent in sent_at])
        n = len(sent_at)
        sent_sum = sum(sent_at)
        self.count += n
        sums = self.sums
        sums["queue_wait"] += n * taken - sent_sum
        sums["execution"] += n * (committed - taken)
        sums["total"] += n * replied - sent_sum
        self._summary = None

    def summary(self) -> LatencySeries:
        """Percentiles and maximum of each series, in milliseconds."""
        if self._summary is None:
            self._summary = {
                "queue_wait": _percentiles(self.queue_wait),
                "execution": _percentiles(self.execution),
                "total": _percentiles(self.total),
            }
        return self._summary  # shared until the next batch: read it, do not change it

    def sums_seconds(self) -> LatencySums:
        """Seconds spent by all requests timed so far, per series."""
        return {
            "queue_wait": self.sums["queue_wait"],
            "execution": self.sums["execution"],
            "total": self.sums["total"],
        }


def _percentiles(series: deque[float]) -> LatencyFigures:
    ordered = sorted(series)
    if not ordered:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}

    def at(share: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": 1000 * ordered[-1]}


class SlowLog:
    """Warns about requests slower than a threshold, at most once a second."""

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold
        self._next_at = 0.0
        self._suppressed = 0

    def warn(self, seconds: float, description: str) -> None:
        """Log that a request took ``seconds`` (the caller checked the threshold)."""
        now = time.monotonic()
        if now < self._next_at:
            self._suppressed += 1
            return
        self._next_at = now + 1.0
        more = f" (and {self._suppressed} more since the last warning)" if self._suppressed else ""
        self._suppressed = 0
        log.warning("mpwriter: slow request, %.3f s: %s%s", seconds, description, more)


class Load:
    """How much of the wall time the writer spends serving batches, and at what rate.

    A batch is served from the moment the loop turns to it (gathering late
    callers, running, committing, sending the replies, tidying) until it
    turns back to waiting: the writer can do nothing else then, so a share
    of the wall time near 1 means callers are queueing for the one writer.
    Recent figures cover the last `WINDOW` seconds (fewer after a start),
    in one-second buckets, so a reading follows a change within seconds.
    """

    WINDOW = 10

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds = 0.0  # busy since the start
        # [whole second, busy seconds, requests] per second served in, oldest first
        self._buckets: deque[list[float]] = deque()

    def served(self, began: float, requests: int) -> None:
        """Count one batch: it began at ``began`` and served ``requests`` requests."""
        now = time.monotonic()
        busy = now - began
        self.seconds += busy
        second = float(int(now))
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            bucket = buckets[-1]
            bucket[1] += busy
            bucket[2] += requests
        else:
            buckets.append([second, busy, requests])
            while buckets[0][0] < second - self.WINDOW:
                buckets.popleft()

    def recent(self) -> tuple[float, float]:
        """The busy share (0 to 1) and the requests per second of the recent window."""
        now = time.monotonic()
        since = int(now) - self.WINDOW
        span = now - max(self.started, since)
        busy = requests = 0.0
        for second, seconds, count in self._buckets:
            if second >= since:
                busy += seconds
                requests += count
        if span <= 0:
            return 0.0, 0.0
        # A batch is counted in the second it ended: one that began before
        # the window could make the share pass 1.
        return min(1.0, busy / span), requests / span
