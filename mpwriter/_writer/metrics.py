"""Figures for watching a writer: latency percentiles, slow-request log, Prometheus text.

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
from typing import Any

log = logging.getLogger("mpwriter")

_WINDOW = 10_000
_PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))


class Latencies:
    """The last few thousand requests' timings, in seconds."""

    def __init__(self, window: int = _WINDOW) -> None:
        self.queue_wait: deque[float] = deque(maxlen=window)
        self.execution: deque[float] = deque(maxlen=window)
        self.total: deque[float] = deque(maxlen=window)

    def record_batch(
        self, sent_at: list[float], taken: float, committed: float, replied: float
    ) -> None:
        """Record one batch: its requests' send times; when it was taken,
        committed, and its replies written."""
        self.queue_wait.extend([taken - sent for sent in sent_at])
        self.execution.extend([committed - taken] * len(sent_at))
        self.total.extend([replied - sent for sent in sent_at])

    def summary(self) -> dict[str, dict[str, float]]:
        """Percentiles and maximum of each series, in milliseconds."""
        return {
            name: _percentiles(series)
            for name, series in (
                ("queue_wait", self.queue_wait),
                ("execution", self.execution),
                ("total", self.total),
            )
        }


def _percentiles(series: deque[float]) -> dict[str, float]:
    ordered = sorted(series)
    if not ordered:
        return {name: 0.0 for name, _ in _PERCENTILES} | {"max": 0.0}
    figures = {
        name: 1000 * ordered[min(len(ordered) - 1, int(share * len(ordered)))]
        for name, share in _PERCENTILES
    }
    figures["max"] = 1000 * ordered[-1]
    return figures


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


def prometheus_text(stats: dict[str, Any], prefix: str = "mpwriter") -> str:
    """Render `Writer.stats()` in the Prometheus text exposition format.

    Serve it from your own metrics endpoint; mpwriter opens no socket.
    """
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {prefix}_{name} {help_text}")
        lines.append(f"# TYPE {prefix}_{name} {kind}")
        lines.extend(f"{prefix}_{name}{labels} {value:g}" for labels, value in samples)

    for key, help_text in (
        ("requests", "Requests served in batches."),
        ("batches", "Group commits attempted."),
        ("commits", "Group commits that succeeded."),
        ("errors", "Requests that failed."),
        ("retries", "Waits for a lock held outside mpwriter."),
        ("expired", "Requests dropped unapplied because their caller had given up."),
        ("lost_requests", "Requests lost with a writer process that died."),
        ("posts_dropped", "Fire-and-forget writes dropped by callers (queue full)."),
        ("restarts", "Writer processes restarted after dying."),
    ):
        metric(f"{key}_total", "counter", help_text, [("", float(stats.get(key, 0)))])
    metric(
        "errors_by_class_total",
        "counter",
        "Failed requests by exception class.",
        [(f'{{class="{name}"}}', float(n)) for name, n in sorted(stats["errors_by_class"].items())],
    )
    for key, help_text in (
        ("queue_depth", "Requests waiting for the writer (estimated from queued bytes)."),
        ("mean_batch_size", "Mean requests per group commit."),
        ("uptime", "Seconds since this writer process started."),
    ):
        metric(key, "gauge", help_text, [("", float(stats.get(key, 0)))])
    for series, figures in sorted(stats.get("latency_ms", {}).items()):
        metric(
            f"latency_{series}_ms",
            "gauge",
            f"Recent requests' {series.replace('_', ' ')} in milliseconds.",
            [(f'{{quantile="{name}"}}', value) for name, value in figures.items()],
        )
    return "\n".join(lines) + "\n"
