"""Closed-loop single-row inserts: mpwriter against the usual alternatives.

Every client inserts one ~100-byte row at a time into
``bench(id INTEGER PRIMARY KEY, client INTEGER, payload TEXT)`` and waits for
the commit before the next one. Modes, each on a fresh WAL database:

  raw       one process, one connection, BEGIN IMMEDIATE ... COMMIT per insert
            (run with one client only: the single-connection ceiling)
  naive     N processes, a connection each, busy_timeout=5000, BEGIN IMMEDIATE
  thread    one process: a writer thread fed by a queue.Queue, N caller threads
            (one transaction per request: no group commit)
  mpwriter  N forked processes sharing one mpwriter.Writer (group commit)
  connected as mpwriter, but each client process gets its handle with
            mpwriter.connect(path), as a process outside the owner's tree would
  echo      as mpwriter, but the writer answers every request OK without
            touching the database: the limit of mpwriter's transport
            (pickling, the request pipe, the writer loop, the reply pipes)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from functools import partial
from typing import Any

import _benchlib as lib
import mpwriter
from mpwriter import testing
from mpwriter._wire.frames import encode_wrote

MODES = ("raw", "naive", "thread", "mpwriter", "connected", "echo")
WRITER_MODES = ("mpwriter", "connected", "echo")
SCHEMA = "CREATE TABLE IF NOT EXISTS bench(id INTEGER PRIMARY KEY, client INTEGER, payload TEXT);"
INSERT = "INSERT INTO bench(client, payload) VALUES (?, ?)"


def payload(client: int) -> str:
    return f"client-{client:04d}:".ljust(100, "x")


def insert_in_own_transaction(conn: sqlite3.Connection, client: int) -> None:
    """BEGIN IMMEDIATE; INSERT; COMMIT -- rolled back if any step fails."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(INSERT, (client, payload(client)))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class ThreadWriter:
    """The classic in-process design: one writer thread fed by a queue.Queue.

    Each request is its own transaction (no group commit); callers block on a
    per-call Future.
    """

    def __init__(self, path: str, sync: str) -> None:
        self._conn = lib.open_connection(path, sync)
        self._queue: queue.Queue[tuple[int, concurrent.futures.Future[None]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="bench-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            client, future = item
            try:
                insert_in_own_transaction(self._conn, client)
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)
        self._conn.close()

    def insert(self, client: int) -> None:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((client, future))
        future.result(timeout=lib.OP_TIMEOUT)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(lib.OP_TIMEOUT)


def mp_insert(writer: mpwriter.Writer, client: int) -> None:
    writer.execute(INSERT, (client, payload(client)))


def make_ops(
    mode: str, path: str, sync: str, clients: list[int], writer: Any
) -> tuple[list[lib.Op], Callable[[], None]]:
    """In a client process: one insert operation per client id, and a cleanup."""
    if mode == "connected":  # the endpoint's handle, not the inherited one
        connected = mpwriter.connect(path)
        return [partial(mp_insert, connected, c) for c in clients], connected.close
    if mode in WRITER_MODES:
        return [partial(mp_insert, writer, c) for c in clients], lambda: None
    if mode == "thread":
        tw = ThreadWriter(path, sync)
        return [partial(tw.insert, c) for c in clients], tw.close
    conn = lib.open_connection(path, sync)  # raw / naive: one connection per process
    return [partial(insert_in_own_transaction, conn, c) for c in clients], conn.close


# -- echo: mpwriter's request-and-reply path with no database behind it ------------------


class EchoEngine:
    """BENCH-ONLY stand-in for the writer's database engine (`mpwriter.testing`'s seam).

    It answers every request of a batch OK -- as an insert would, ``(rowcount 1,
    lastrowid 1, no rows)`` -- without running it: no SQL, no transaction, no
    fsync. Everything else is mpwriter's own code (the caller's pickling and
    frames, the request pipe, the writer loop, reply pipes), so "echo" measures
    the transport's ceiling. It counts requests and batches like the real runner,
    so stats()' mean batch size stays meaningful.
    """

    commit_seconds = 0.0  # no commit: the writer never waits for late callers

    def __init__(self, counters: Any) -> None:
        self._counters = counters

    def run(self, batch: list[Any]) -> list[tuple[Any, bytes]]:
        self._counters.batches += 1
        self._counters.requests += len(batch)
        return [(work.request, encode_wrote(work.request.request_id, 1, 1)) for work in batch]

    def abandon_transaction(self) -> None:
        """Nothing to roll back: no transaction is ever opened."""

    def tidy(self, idle: bool) -> None:
        """No upkeep: nothing is ever written."""

    def close(self) -> None:
        """Nothing to close: no database is ever opened."""


@contextlib.contextmanager
def echo_runner() -> Iterator[None]:
    """While open, writers started with context="fork" serve with `EchoEngine`.

    Through `mpwriter.testing`, the one fault-injection seam: a forked writer
    inherits this process's hook. It stays on until the writer is closed, so
    that a restarted writer would be an echo writer too.
    """
    with testing.inject(engine=EchoEngine):
        yield


# -- one run ----------------------------------------------------------------------------


def count_rows(path: str) -> int:
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        return int(conn.execute("SELECT count(*) FROM bench").fetchone()[0])


def run_once(mode: str, sync: str, clients: int, duration: float, base_dir: str) -> lib.Run:
    """One run on a fresh database; mpwriter/echo also sample the writer's memory."""
    groups = [list(range(clients))] if mode == "thread" else [[c] for c in range(clients)]
    factory = partial(make_ops, mode)
    stats: dict[str, Any] | None = None
    memory: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mpwbench-", dir=base_dir) as tmp:
        path = os.path.join(tmp, "bench.db")
        with closing(lib.open_connection(path, sync)) as conn:
            conn.execute(SCHEMA)
        if mode not in WRITER_MODES:
            summaries, began, problems = lib.run_clients(factory, path, sync, groups, duration)
        else:
            with echo_runner() if mode == "echo" else contextlib.nullcontext():
                owner_rss = lib.proc_memory_mb()["vmrss"]
                writer = lib.start_writer(path, sync)
                try:
                    sampler = lib.writer_sampler(writer)
                    summaries, began, problems = lib.run_clients(
                        factory, path, sync, groups, duration, writer, sampler
                    )
                    memory = sampler.figures() | {"owner_rss_at_start_mb": owner_rss}
                    stats = lib.final_stats(writer, problems)
                finally:
                    writer.close(timeout=30.0)
        rows = count_rows(path)
    run = {"workload": "insert", "mode": mode, "sync": sync}
    run |= lib.summarize(summaries, clients, began, problems)
    run |= {"rows": rows, "expected_rows": 0 if mode == "echo" else run["acked"]}
    run |= {"mean_batch_size": stats["mean_batch_size"] if stats else None, "writer_stats": stats}
    run["writer_max_ms"] = lib.writer_max_ms(stats)
    return run | memory


def configurations(
    modes: list[str], syncs: list[str], clients: list[int]
) -> list[tuple[str, str, int]]:
    """Interleaved: for each (sync, clients), every mode in turn.

    raw runs at 1 client only; echo only under the first sync (it touches no
    database, so durability cannot matter).
    """
    out = []
    for sync in syncs:
        if "raw" in modes:
            out.append(("raw", sync, 1))
        for n in clients:
            for m in modes:
                if m == "raw" or (m == "echo" and sync != syncs[0]):
                    continue
                out.append((m, sync, n))
    return out


def check(run: lib.Run) -> bool:
    """One progress line; loud lines for a row mismatch or a hung/dead client.

    Returns True when the run is sound.
    """
    name = lib.run_name(run)
    errors = sum(run["errors"].values())
    line = f"  {name:24} {run['ops_per_s']:9.0f} w/s  acked={run['acked']} rows={run['rows']}"
    line += f" errors={errors}"
    if run.get("writer_rss_peak_mb"):
        line += f" writer_rss={run['writer_rss_peak_mb']:.1f}MB"
    print(line, flush=True)
    sound = not run["problems"]
    if run["rows"] != run["expected_rows"]:
        sound = False
        print(f"  *** MISMATCH {name}: {run['rows']} rows, {run['expected_rows']} expected ***")
    for problem in run["problems"]:
        print(f"  *** PROBLEM {name}: {problem} ***", flush=True)
    return sound


# -- medians ------------------------------------------------------------------------------

MEDIAN_KEYS = (
    "ops_per_s",
    "p50_ms",
    "p99_ms",
    "fairness",
    "mean_batch_size",
    "writer_rss_peak_mb",
    "writer_hwm_mb",
    "writer_uss_mb",
)
WORST_KEYS = ("max_ms", "writer_max_ms")  # the worst over the runs


def table(results: dict[tuple[str, str, int], list[lib.Run]]) -> list[dict[str, Any]]:
    # raw runs at one client only (see configurations): the baseline of every client count.
    raw = {sync: rate for (sync, _), rate in lib.median_rates(results, "raw").items()}
    rows = []
    for (mode, sync, clients), runs in results.items():
        mismatches = sum(r["rows"] != r["expected_rows"] for r in runs)
        row = lib.table_row((mode, sync, clients), runs, mismatches)
        row |= {key: lib.median_of(runs, key) for key in MEDIAN_KEYS}
        for key in WORST_KEYS:
            row[key] = max((r[key] for r in runs if r.get(key) is not None), default=None)
        row |= lib.spread_of(runs)
        row["vs_raw"] = row["ops_per_s"] / raw[sync] if raw.get(sync) and mode != "raw" else None
        rows.append(row)
    return rows


COLUMNS: list[lib.Column] = [
    *lib.lead_columns(-8, "writes/s", 9),
    ("vs raw", 6, lambda r: lib.cell(r["vs_raw"], ".2f")),
    ("wRSS MB", 7, lambda r: lib.cell(r["writer_rss_peak_mb"], ".1f")),
    ("wUSS MB", 7, lambda r: lib.cell(r["writer_uss_mb"], ".1f")),
]
