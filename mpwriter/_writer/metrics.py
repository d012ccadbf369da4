"""Figures for watching a writer: latency percentiles, slow-request log, Prometheus text.

The writer keeps the timings of its most recent requests (a bounded window,
so memory stays flat) split into queue wait (sent by the caller -> taken by
the writer) and execution (taken -> committed); ``total`` runs until the reply
is written. Callers' and the writer's monotonic clocks are the same
system-wide clock, so the difference is meaningful across processes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

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


# The counters of `Stats`, each exposed as <prefix>_<name>_total.
_COUNTERS = (
    ("requests", "Requests served in batches."),
    ("batches", "Group commits attempted."),
    ("commits", "Group commits that succeeded."),
    ("errors", "Requests answered with an error."),
    ("retries", "Waits for a database lock held outside mpwriter."),
    ("refused", "Statements refused (transaction control, ATTACH)."),
    ("expired", "Requests dropped unapplied because their caller had given up."),
    ("replayed_batches", "Batches replayed without a request that spoiled the transaction."),
    ("lost_requests", "Requests taken by a writer process that died (outcome unknown)."),
    ("gather_waits", "Batches that waited for callers just answered, to share a costly commit."),
    ("gathered", "Requests that came during those waits and shared the commit."),
    ("posts_dropped", "Fire-and-forget writes dropped by callers (queue full)."),
    ("sessions", "Interactive sessions (transactions) opened."),
    ("sessions_expired", "Interactive sessions rolled back by the writer (limit, caller gone)."),
    ("session_waits", "Requests held while an interactive session was open."),
    ("session_wait_seconds", "Seconds requests spent held behind interactive sessions."),
    ("dropped_partial_requests", "Requests dropped half-received (their sender died)."),
    ("resync_skipped_bytes", "Request-pipe bytes skipped to find the next whole frame."),
    ("restarts", "Writer processes restarted after dying."),
)
_GAUGES = (
    ("queue_depth", "queue_depth", "Requests waiting (estimated from the queued bytes)."),
    ("queued_bytes", "queued_bytes", "Bytes waiting in the request pipe."),
    ("reply_pipes", "reply_pipes", "Callers' reply pipes the writer holds."),
    ("mean_batch_size", "mean_batch_size", "Mean requests per group commit since the start."),
    ("uptime", "uptime_seconds", "Seconds since this writer process started."),
)
_BY_CLASS = (
    ("errors_by_class", "Requests answered with an error, by exception class."),
    ("post_errors_by_class", "Fire-and-forget writes that failed, by exception class."),
)
_SERIES = (
    ("queue_wait", "Time from a caller sending a request to the writer taking it"),
    ("execution", "Time from the writer taking a request's batch to its commit"),
    ("total", "Time from a caller sending a request to its reply being written"),
)
_QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"), ("1", "max"))


def prometheus_text(stats: Mapping[str, Any], prefix: str = "mpwriter") -> str:
    """Render `Writer.stats()` in Prometheus' text exposition format (version 0.0.4).

    Names follow Prometheus' conventions: counters end in ``_total``, times
    are in seconds, latencies are summaries whose ``quantile`` labels are
    numbers (``0.5``, ``0.9``, ``0.99``, and ``1`` for the maximum) over the
    last 10,000 requests, with ``_sum`` and ``_count`` since the writer
    started. Counts restart from zero with each writer process, as a
    restarted exporter's would. Serve it from your own metrics endpoint;
    mpwriter opens no socket.
    """
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> str:
        full = f"{prefix}_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        return full

    for key, help_text in _COUNTERS:
        full = family(f"{key}_total", "counter", help_text)
        lines.append(f"{full} {_number(stats[key])}")
    for key, help_text in _BY_CLASS:
        full = family(f"{key}_total", "counter", help_text)
        for name, count in sorted(stats[key].items()):
            lines.append(f'{full}{{class="{_label_value(name)}"}} {_number(count)}')
    for key, name, help_text in _GAUGES:
        full = family(name, "gauge", help_text)
        lines.append(f"{full} {_number(stats[key])}")
    for series, help_text in _SERIES:
        full = family(
            f"latency_{series}_seconds",
            "summary",
            f"{help_text}, in seconds; quantiles over the last 10,000 requests.",
        )
        figures = stats["latency_ms"][series]
        for quantile, key in _QUANTILES:
            lines.append(f'{full}{{quantile="{quantile}"}} {_number(figures[key] / 1000)}')
        lines.append(f"{full}_sum {_number(stats['latency_sum_seconds'][series])}")
        lines.append(f"{full}_count {_number(stats['latency_count'])}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    # repr keeps every digit of a float; "g" formatting would print a counter
    # past a million as 1.23457e+06 and lose its last digits.
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
