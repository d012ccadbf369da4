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
from dataclasses import dataclass, replace
from typing import Annotated, TypedDict, get_type_hints

from .address import is_server_url

SNAPSHOT_SUFFIX = ".mpwriter-stats.json"
# Bumped when a snapshot's layout changes incompatibly; readers refuse others.
SNAPSHOT_FORMAT = 1


@dataclass(frozen=True)
class Figure:
    """How one figure of `Stats` is shown: its kind, help text and unit.

    Declared once, beside the figure's type in `Stats` (as ``Annotated``
    metadata), and read from there by every view: the writer's counters, the
    Prometheus exposition and the command line's text.
    """

    kind: str  # COUNTER, GAUGE, SUMMARY, INFO or PART
    help: str  # one sentence, for Prometheus' HELP and for people
    unit: str = ""  # "seconds", "bytes", "ms": what a number counts, if not things
    label: str = ""  # a dict of counts: one sample per key, under this label
    parts: tuple[str, ...] = ()  # a SUMMARY's count and sums figures
    name: str = ""  # the key in `Stats`, filled in by `FIGURES`


COUNTER = "counter"  # only grows while one writer process lives
GAUGE = "gauge"  # a level, up or down
SUMMARY = "summary"  # percentiles, with the count and sums in `Figure.parts`
INFO = "info"  # a fact about the writer (pid, state), not a number to graph
PART = "part"  # shown with the SUMMARY that names it in its parts


def counter(help_text: str, *, unit: str = "", label: str = "") -> Figure:
    return Figure(COUNTER, help_text, unit, label)


def gauge(help_text: str, *, unit: str = "") -> Figure:
    return Figure(GAUGE, help_text, unit)


def info(help_text: str) -> Figure:
    return Figure(INFO, help_text)


def part(help_text: str) -> Figure:
    return Figure(PART, help_text)


class LatencyFigures(TypedDict):
    """Percentiles and maximum of one latency series, in milliseconds."""

    p50: float
    p90: float
    p99: float
    max: float


class LatencySeries(TypedDict):
    """The last 10,000 requests' latencies, split by where the time went.

    Each series' metadata is its help text.
    """

    queue_wait: Annotated[
        LatencyFigures, "Time from a caller sending a request to the writer taking it"
    ]
    execution: Annotated[
        LatencyFigures, "Time from the writer taking a request's batch to its commit"
    ]
    total: Annotated[
        LatencyFigures, "Time from a caller sending a request to its reply being written"
    ]


class LatencySums(TypedDict):
    """Seconds spent by every request timed since the writer started."""

    queue_wait: float
    execution: float
    total: float


class Stats(TypedDict):
    """What `Writer.stats()` returns: one writer process's figures.

    Counts run from the start of the current writer process (a restarted
    writer starts from zero) except ``restarts``, which the owner keeps.
    Each figure's kind and help text are declared here, beside its type, and
    every view of the figures (Prometheus, the command line) is derived from
    them: a new figure is one line here and the code that sets it.
    """

    requests: Annotated[int, counter("Requests served in batches.")]
    batches: Annotated[int, counter("Group commits attempted.")]
    commits: Annotated[int, counter("Group commits that succeeded.")]
    mean_batch_size: Annotated[
        float, gauge("Mean requests per group commit since the start (requests / batches).")
    ]
    errors: Annotated[int, counter("Requests answered with an error.")]
    errors_by_class: Annotated[
        dict[str, int],
        counter("Requests answered with an error, by exception class.", label="class"),
    ]
    retries: Annotated[int, counter("Waits for a database lock held outside mpwriter.")]
    refused: Annotated[int, counter("Statements refused (transaction control, ATTACH).")]
    expired: Annotated[
        int, counter("Requests dropped unapplied because their caller had given up.")
    ]
    replayed_batches: Annotated[
        int, counter("Batches replayed without a request that spoiled the transaction.")
    ]
    lost_requests: Annotated[
        int, counter("Requests taken by a writer process that died (outcome unknown).")
    ]
    gather_waits: Annotated[
        int,
        counter("Batches that waited for callers just answered, to share a costly commit."),
    ]
    gathered: Annotated[
        int, counter("Requests that came during those waits and shared the commit.")
    ]
    posts_dropped: Annotated[
        int, counter("Fire-and-forget writes dropped by callers (queue full).")
    ]
    sessions: Annotated[int, counter("Interactive sessions (transactions) opened.")]
    sessions_expired: Annotated[
        int,
        counter(
            "Interactive sessions rolled back by the writer: a limit passed, the caller"
            " was gone, or the writer was closing."
        ),
    ]
    session_waits: Annotated[int, counter("Requests held while an interactive session was open.")]
    session_wait_seconds: Annotated[
        float,
        counter("Seconds requests spent held behind interactive sessions.", unit="seconds"),
    ]
    post_errors_by_class: Annotated[
        dict[str, int],
        counter("Fire-and-forget writes that failed, by exception class.", label="class"),
    ]
    queue_depth: Annotated[int, gauge("Requests waiting (estimated from the queued bytes).")]
    queued_bytes: Annotated[int, gauge("Bytes in the request pipe, not read yet.", unit="bytes")]
    reply_pipes: Annotated[int, gauge("Callers' reply pipes the writer holds.")]
    uptime: Annotated[float, gauge("Seconds since this writer process started.", unit="seconds")]
    busy_seconds: Annotated[
        float,
        counter(
            "Seconds the writer spent serving batches (gathering, running, committing, replying).",
            unit="seconds",
        ),
    ]
    busy_share: Annotated[
        float,
        gauge(
            "Share of the last 10 seconds the writer spent serving batches, 0 to 1;"
            " near 1, callers queue for the one writer."
        ),
    ]
    requests_per_second: Annotated[
        float, gauge("Requests served per second over the last 10 seconds.")
    ]
    pid: Annotated[int, info("The writer process.")]
    restarts: Annotated[int, counter("Writer processes restarted after dying.")]
    # "running", or "closing" once close() or SIGTERM began
    state: Annotated[str, info("What the writer is doing: running or closing.")]
    resync_skipped_bytes: Annotated[
        int, counter("Request-pipe bytes skipped to find the next whole frame.", unit="bytes")
    ]
    dropped_partial_requests: Annotated[
        int, counter("Requests dropped half-received (their sender died).")
    ]
    dropped_partial_request_bytes: Annotated[
        int,
        counter(
            "Bytes of requests dropped half-received, with hand-overs dropped past the"
            " writer's byte bound.",
            unit="bytes",
        ),
    ]
    dropped_orphan_replies: Annotated[
        int, counter("Replies kept for a restarted caller, dropped past the writer's bound.")
    ]
    dropped_orphan_reply_bytes: Annotated[
        int, counter("Bytes of replies kept for a restarted caller, dropped.", unit="bytes")
    ]
    latency_ms: Annotated[
        LatencySeries,
        Figure(
            SUMMARY,
            "Latency percentiles of the last 10,000 requests.",
            unit="ms",
            parts=("latency_count", "latency_sum_seconds"),
        ),
    ]
    latency_count: Annotated[int, part("Requests timed since the writer started.")]
    latency_sum_seconds: Annotated[
        LatencySums, part("Their total time, in seconds, for rates and means.")
    ]


def _declared(typed_dict: type) -> dict[str, tuple[object, ...]]:
    """Each key's ``Annotated`` metadata, in declaration order."""
    hints = get_type_hints(typed_dict, include_extras=True)
    return {name: getattr(hint, "__metadata__", ()) for name, hint in hints.items()}


def _figures() -> tuple[Figure, ...]:
    figures = []
    for name, metadata in _declared(Stats).items():
        declared = [m for m in metadata if isinstance(m, Figure)]
        if len(declared) != 1:
            # Every view is derived from the declaration: a figure without
            # one would be missing from them all.
            raise TypeError(f"Stats[{name!r}] must be Annotated with one Figure (kind, help)")
        figures.append(replace(declared[0], name=name))
    return tuple(figures)


# Every figure of `Stats`, in declaration order, named.
FIGURES: tuple[Figure, ...] = _figures()
# Each latency series and its help text, in declaration order.
LATENCY_SERIES: tuple[tuple[str, str], ...] = tuple(
    (name, str(metadata[0])) for name, metadata in _declared(LatencySeries).items()
)


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
    if is_server_url(database):
        return None
    return os.path.realpath(database) + SNAPSHOT_SUFFIX
