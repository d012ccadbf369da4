"""The shape of a writer's figures, and where a writer publishes them.

Both sides share these: the writer builds the figures (answering STATS, and
publishing a snapshot for ``python -m mpwriter stats``), callers and the
command line read them. Imports neither side.

Snapshot location: a writer of the SQLite file ``app.db`` publishes its
figures beside it, in ``app.db.mpwriter-stats.json`` (the same directory as
its lock file ``app.db.mpwriter.lock``), so that whoever may read the
database's directory can find them and nobody needs a registry. A database
named by a URL (``postgresql://...``) has no directory beside it: its
snapshot would live under a per-user runtime directory, named from the URL
without its credentials. That is not implemented yet: `snapshot_path` returns
None for a URL, and such a writer publishes nothing.
"""

from __future__ import annotations

import os
from typing import TypedDict

SNAPSHOT_SUFFIX = ".mpwriter-stats.json"
# Bumped when a snapshot's layout changes incompatibly; readers refuse others.
SNAPSHOT_FORMAT = 1


class LatencyFigures(TypedDict):
    """Percentiles and maximum of one latency series, in milliseconds."""

    p50: float
    p90: float
    p99: float
    max: float


class LatencySeries(TypedDict):
    """The last 10,000 requests' latencies, split by where the time went."""

    queue_wait: LatencyFigures  # sent by the caller -> taken by the writer
    execution: LatencyFigures  # taken -> committed
    total: LatencyFigures  # sent -> reply written


class LatencySums(TypedDict):
    """Seconds spent by every request timed since the writer started."""

    queue_wait: float
    execution: float
    total: float


class Stats(TypedDict):
    """What `Writer.stats()` returns: one writer process's figures.

    Counts run from the start of the current writer process (a restarted
    writer starts from zero) except ``restarts``, which the owner keeps.
    """

    requests: int  # requests served in batches
    batches: int  # group commits attempted
    commits: int  # group commits that succeeded
    mean_batch_size: float  # requests / batches
    errors: int  # requests answered with an error
    errors_by_class: dict[str, int]  # the same, by exception class name
    retries: int  # waits for a lock held outside mpwriter
    refused: int  # statements refused (transaction control, ATTACH)
    expired: int  # requests dropped unapplied: their caller had given up
    replayed_batches: int  # batches replayed without a request that spoiled them
    lost_requests: int  # requests taken by a writer that died
    gather_waits: int  # batches that waited for callers just answered (a costly commit)
    gathered: int  # requests that came during those waits and shared the commit
    posts_dropped: int  # fire-and-forget writes dropped by callers
    sessions: int  # interactive sessions (transactions) opened
    sessions_expired: int  # ... rolled back by the writer: a limit, a gone caller, closing
    session_waits: int  # requests held while a session was open
    session_wait_seconds: float  # ... the seconds they spent held, summed
    post_errors_by_class: dict[str, int]  # fire-and-forget writes that failed
    queue_depth: int  # requests waiting (estimated from the queued bytes)
    queued_bytes: int  # bytes in the request pipe, not read yet
    reply_pipes: int  # callers' reply pipes the writer holds
    uptime: float  # seconds since this writer process started
    pid: int  # this writer process
    restarts: int  # writer processes restarted after dying
    state: str  # "running", or "closing" once close() or SIGTERM began
    resync_skipped_bytes: int  # request-pipe bytes skipped to find a frame again
    dropped_partial_requests: int  # requests whose sender died mid-way
    # ... their bytes, with hand-overs dropped past the writer's byte bound
    dropped_partial_request_bytes: int
    dropped_orphan_replies: int  # replies kept for a restarted caller, dropped past the bound
    dropped_orphan_reply_bytes: int  # ... their bytes
    latency_ms: LatencySeries  # recent percentiles
    latency_count: int  # requests timed since the writer started
    latency_sum_seconds: LatencySums  # their total time, for rates and means


class Snapshot(TypedDict):
    """The figures a writer publishes for ``python -m mpwriter stats``."""

    format: int  # SNAPSHOT_FORMAT
    database: str  # the absolute path the writer serves
    pid: int  # the writer process
    state: str  # "serving" or "closing"
    published_at: float  # time.time() when written, for people
    monotonic: float  # time.monotonic() when written: the system-wide clock ages use
    stats: Stats


def snapshot_path(database: str) -> str | None:
    """Where the writer of ``database`` publishes its figures; None for a URL."""
    if "://" in database:
        return None
    return os.path.abspath(database) + SNAPSHOT_SUFFIX
