"""What ``python -m mpwriter stats`` reads and shows: a writer's published figures.

The command line never talks to the writer. It reads the snapshot the writer
publishes beside the database (`_writer.published`), and checks that a writer
really holds the database's lock, so that a snapshot left behind by a writer
that died is not shown as live figures, and that the snapshot was written by
the writer's user, so that figures forged by another user are not shown at
all (`_check_trust`). Reading needs nothing but read access
to the database's directory and the snapshot; it changes nothing, takes no
lock and sends nothing, so it works on a flooded or stuck writer and gives
nobody a way to act on it.

Who holds the lock is read from ``/proc/locks`` (Linux), which lists every
flock with its holder's pid and the file's inode: unlike trying the lock
ourselves, that cannot make a writer that is starting at the same instant
fail with "already running". Where ``/proc/locks`` does not exist (macOS),
the snapshot's writer pid must still be alive.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from string import Formatter
from typing import Any

from ._wire.stats import FIGURES, LATENCY_SERIES, SNAPSHOT_FORMAT, Snapshot, Stats, snapshot_path
from ._writer.claim import lock_path

# The writer publishes about once a second, between batches; a snapshot older
# than this means its loop has not come back from a batch.
STALE_AFTER = 3.0
_MAX_SNAPSHOT_BYTES = 1 << 20

# Exit statuses of the command line.
NO_WRITER = 1
UNSUPPORTED = 2
NO_FIGURES = 3
UNTRUSTED = 4


class NotWatchable(Exception):
    """The figures cannot be shown; ``str()`` is the one line to print."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Reading:
    """One look at a writer: its snapshot and how old it is."""

    snapshot: Snapshot
    age: float  # seconds since the writer published it

    @property
    def stats(self) -> Stats:
        return self.snapshot["stats"]

    @property
    def stale(self) -> bool:
        return self.age > STALE_AFTER

    @property
    def state(self) -> str:
        """The writer's state: serving, closing, or busy when its snapshot has gone stale."""
        return "busy" if self.stale else self.snapshot["state"]

    def as_json(self) -> dict[str, Any]:
        return {
            "database": self.snapshot["database"],
            "pid": self.snapshot["pid"],
            "state": self.state,
            "published_at": self.snapshot["published_at"],
            "age_seconds": self.age,
            "stale": self.stale,
            "stats": self.stats,
        }


def read(database: str) -> Reading:
    """The figures of the writer serving ``database``; raises `NotWatchable`."""
    snapshot_file = snapshot_path(database)
    if snapshot_file is None:
        raise NotWatchable(
            f"mpwriter: {database}: only SQLite files can be watched so far, not URLs",
            UNSUPPORTED,
        )
    shown = os.path.realpath(database)
    lock_file = lock_path(database)
    holders = _lock_holders(lock_file)
    loaded = _load(snapshot_file)
    snapshot = loaded[0] if loaded is not None else None
    if holders is not None:
        serving = bool(holders)
    else:  # no /proc/locks: trust a live pid
        serving = snapshot is not None and _alive(snapshot["pid"])
    if not serving:
        left = ""
        if snapshot is not None:
            left = f" (figures left by writer pid {snapshot['pid']}, which is gone)"
        raise NotWatchable(f"mpwriter: no writer serves {shown}{left}", NO_WRITER)
    if loaded is not None:
        _check_trust(snapshot_file, loaded[1], lock_file, shown)
    # A holder other than the snapshot's pid is a successor still starting
    # (running ``init``) after its predecessor died -- unless that pid lives
    # on and only looks different (the lock table shows another pid namespace).
    if snapshot is None or (
        holders and snapshot["pid"] not in holders and not _alive(snapshot["pid"])
    ):
        holder = f" (pid {min(holders)})" if holders else ""
        raise NotWatchable(
            f"mpwriter: the writer of {shown}{holder} has published no figures yet:"
            " it is starting or closing, or it is an mpwriter without `stats` support",
            NO_FIGURES,
        )
    return Reading(snapshot, max(0.0, time.monotonic() - snapshot["monotonic"]))


def _check_trust(path: str, info: os.stat_result, lock_file: str, database: str) -> None:
    """Raise `NotWatchable` unless the snapshot can only have been written by the writer's user.

    The writer's user is the owner of the lock file it holds (a writer
    refuses a lock file of another user's); that user must also own the
    database, or be root, so that a user who planted both a lock file and a
    snapshot beside someone else's database is not believed either.
    """
    reason = ""
    if info.st_mode & 0o022:
        reason = f"other users may write it (mode {stat.S_IMODE(info.st_mode):04o})"
    else:
        try:
            lock_owner = os.stat(lock_file).st_uid
            database_owner = os.stat(database).st_uid
        except OSError as exc:
            reason = f"cannot check who owns the writer's files ({exc.strerror})"
        else:
            if info.st_uid != lock_owner:
                reason = (
                    f"it belongs to uid {info.st_uid}, the writer's lock file to uid {lock_owner}"
                )
            elif info.st_uid not in (0, database_owner):
                reason = f"it belongs to uid {info.st_uid}, the database to uid {database_owner}"
    if reason:
        raise NotWatchable(
            f"mpwriter: not showing the figures in {path}: {reason}, so they may be forged",
            UNTRUSTED,
        )


def _load(path: str) -> tuple[Snapshot, os.stat_result] | None:
    """The snapshot at ``path`` and its file's status, None if there is none.

    Raises `NotWatchable`.
    """
    try:
        # O_NOFOLLOW: a symlink planted there is not a writer's snapshot.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NotWatchable(
            f"mpwriter: cannot read {path}: {exc.strerror} (it has the database's permissions)",
            NO_FIGURES,
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotWatchable(f"mpwriter: {path} is not a writer's snapshot", NO_FIGURES)
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(_MAX_SNAPSHOT_BYTES + 1)
    finally:
        os.close(fd)
    try:
        snapshot = json.loads(data)
        if len(data) > _MAX_SNAPSHOT_BYTES or snapshot.get("format") != SNAPSHOT_FORMAT:
            raise ValueError("unknown format")
        for key in ("pid", "monotonic", "stats", "state", "database"):
            snapshot[key]
    except (ValueError, AttributeError, KeyError) as exc:
        raise NotWatchable(
            f"mpwriter: {path} is not a snapshot this mpwriter can read", NO_FIGURES
        ) from exc
    result: Snapshot = snapshot
    return result, info


def _lock_holders(lock_file: str) -> set[int] | None:
    """Pids holding an exclusive flock on ``lock_file``; None where that is unknowable."""
    try:
        inode = os.stat(lock_file).st_ino
    except FileNotFoundError:
        return set()  # no writer ever ran here, or it was removed with its lock
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as file:
            table = file.read()
    except OSError:
        return None
    holders: set[int] = set()
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2147866 0 EOF"; a waiter's
        # line has "->" after the number and holds nothing.
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        kind, access, pid, where = fields[1], fields[3], fields[4], fields[5]
        # The inode alone: the device numbers /proc/locks shows differ from
        # st_dev on some filesystems (overlayfs, btrfs).
        if kind == "FLOCK" and access == "WRITE" and where.rsplit(":", 1)[-1] == str(inode):
            holders.add(int(pid))
    return holders


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


# -- showing it ------------------------------------------------------------------


# The human summary, a line a topic. Each template names the `Stats` figures
# it shows; `describe` lists every figure no line names after them, so a new
# figure is shown before anyone writes a line for it.
_LINES = (
    ("uptime", "{uptime:.1f} s, {restarts} restarts"),
    (
        "queue",
        "{queue_depth} requests waiting ({queued_bytes} bytes), {reply_pipes} reply pipes",
    ),
    (
        "requests",
        "{requests} in {batches} batches (mean {mean_batch_size:.2f}), {commits} commits",
    ),
    (
        "errors",
        "{errors}{errors_by_class}, {refused} refused, {expired} expired,"
        " {lost_requests} lost with a dead writer",
    ),
    (
        "load",
        "busy {busy_share:.0%} of the last 10 s, {requests_per_second:.0f} requests/s;"
        " {busy_seconds:.1f} s busy in all",
    ),
    ("retries", "{retries} waits for a lock held outside mpwriter"),
    ("posts", "{posts_dropped} dropped, {post_errors_by_class} failed"),
    (
        "batching",
        "{gather_waits} waits for late callers, who brought {gathered};"
        " {replayed_batches} batches replayed",
    ),
    (
        "sessions",
        "{sessions} opened, {sessions_expired} rolled back by the writer;"
        " {session_waits} requests held behind them, {session_wait_seconds:.1f} s in all",
    ),
    (
        "dropped",
        "{dropped_partial_requests} half-received requests"
        " ({dropped_partial_request_bytes} bytes), {dropped_orphan_replies} orphan replies"
        " ({dropped_orphan_reply_bytes} bytes), {resync_skipped_bytes} bytes skipped to resync",
    ),
)
# Shown by the first line (from the snapshot) and the latency table.
_SHOWN_APART = {"pid", "state", "latency_ms", "latency_count", "latency_sum_seconds"}
_SHOWN = _SHOWN_APART | {
    field for _, template in _LINES for _, field, _, _ in Formatter().parse(template) if field
}


def describe(reading: Reading) -> str:
    """The figures, for people: a few lines."""
    snapshot, stats = reading.snapshot, reading.stats
    freshness = f"figures {reading.age:.1f} s old"
    if reading.stale:
        freshness += (
            f" -- STALE: the writer has not come back from a batch for {reading.age:.0f} s"
            " (a long request, or stuck)"
        )
    every: dict[str, Any] = dict(stats)  # looked up by names held in tables
    values = dict(every)
    by_class = ", ".join(f"{name} {n}" for name, n in sorted(stats["errors_by_class"].items()))
    values["errors_by_class"] = f" ({by_class})" if by_class else ""
    values["post_errors_by_class"] = sum(stats["post_errors_by_class"].values())
    lines = [
        f"mpwriter writer of {snapshot['database']}: pid {snapshot['pid']},"
        f" {snapshot['state']}; {freshness}"
    ]
    lines += [f"  {topic:<11}{template.format_map(values)}" for topic, template in _LINES]
    rest = [
        f"{figure.name} {_plain(every[figure.name])}{f' {figure.unit}' if figure.unit else ''}"
        for figure in FIGURES
        if figure.name not in _SHOWN
    ]
    if rest:
        lines.append(f"  {'more':<11}{', '.join(rest)}")
    count = stats["latency_count"]
    lines.append(
        "  latency ms (last 10,000 requests)   p50       p90       p99       max"
        f"{f'mean of {count}':>16}"
    )
    for series, _ in LATENCY_SERIES:
        figures = every["latency_ms"][series]
        shown = "".join(f"{figures[key]:10.2f}" for key in ("p50", "p90", "p99", "max"))
        mean = 1000 * every["latency_sum_seconds"][series] / count if count else 0.0
        lines.append(f"    {series.replace('_', ' '):<30}{shown}{mean:16.2f}")
    return "\n".join(lines)


def _plain(value: object) -> str:
    if isinstance(value, dict):
        return "(" + ", ".join(f"{key} {_plain(v)}" for key, v in sorted(value.items())) + ")"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


WATCH_HEADER = (
    "time      state      queue    req/s  batch   p50 ms   p99 ms  restarts   age s  busy %"
)


def watch_line(reading: Reading | None, previous: Reading | None, problem: str = "") -> str:
    """One line of the live view; rates come from the ``previous`` reading."""
    now = time.strftime("%H:%M:%S")
    if reading is None:
        return f"{now}  {problem}"
    stats = reading.stats
    rate = batch = busy = "-"
    if previous is not None and previous.snapshot["pid"] == reading.snapshot["pid"]:
        elapsed = reading.snapshot["monotonic"] - previous.snapshot["monotonic"]
        requests = stats["requests"] - previous.stats["requests"]
        batches = stats["batches"] - previous.stats["batches"]
        if elapsed > 0:
            rate = f"{requests / elapsed:.0f}"
            batch = f"{requests / batches:.1f}" if batches else "-"
            busy_seconds = stats["busy_seconds"] - previous.stats["busy_seconds"]
            # A batch counts when it ends: one longer than the interval would pass 100.
            busy = f"{min(100.0, 100 * busy_seconds / elapsed):.0f}"
    total = stats["latency_ms"]["total"]
    return (
        f"{now}  {reading.state:<9}{stats['queue_depth']:>7}{rate:>9}{batch:>7}"
        f"{total['p50']:>9.2f}{total['p99']:>9.2f}{stats['restarts']:>10}{reading.age:>8.1f}{busy:>8}"
    )
