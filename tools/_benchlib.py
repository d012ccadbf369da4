"""Client side of tools/bench.py: the write operations, the timed loop, the summaries.

Every client runs `drive`: wait for the start signal, insert one row at a time
until the shared deadline (a `time.monotonic()` value, which is system-wide on
Linux), then report one compact `Summary` through a pipe.
"""

from __future__ import annotations

import concurrent.futures
import queue
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, TypedDict

SCHEMA = "CREATE TABLE IF NOT EXISTS bench(id INTEGER PRIMARY KEY, client INTEGER, payload TEXT);"
INSERT = "INSERT INTO bench(client, payload) VALUES (?, ?)"
BUSY_TIMEOUT_MS = 5000
OP_TIMEOUT = 10.0  # mpwriter and thread-writer per-call timeout, seconds
START_TIMEOUT = 60.0  # a client that never gets the start signal gives up
MAX_SAMPLES = 20_000

Op = Callable[[], None]


class Summary(TypedDict):
    client: int
    count: int  # acknowledged (committed) writes
    errors: dict[str, int]  # "ExceptionClass: message" -> occurrences
    samples: list[float]  # sorted latencies (ms) of successful writes, at most MAX_SAMPLES
    max_ms: float
    last_end: float  # time.monotonic() when the last write returned


def payload(client: int) -> str:
    return f"client-{client:04d}:".ljust(100, "x")


def error_key(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:100]


def open_connection(path: str, sync: str, busy_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    return conn


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
        self._conn = open_connection(path, sync)
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
        future.result(timeout=OP_TIMEOUT)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(OP_TIMEOUT)


def drive(client: int, op: Op, deadline: float) -> Summary:
    """Call ``op`` back to back until ``deadline``; time each call."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    last_end = time.monotonic()
    while last_end < deadline:
        t0 = time.perf_counter()
        try:
            op()
        except Exception as exc:
            errors[error_key(exc)] += 1
        else:
            latencies.append(time.perf_counter() - t0)
        last_end = time.monotonic()
    count = len(latencies)
    max_ms = max(latencies, default=0.0) * 1000
    if count > MAX_SAMPLES:
        latencies = random.sample(latencies, MAX_SAMPLES)
    samples = sorted(x * 1000 for x in latencies)
    return Summary(
        client=client,
        count=count,
        errors=dict(errors),
        samples=samples,
        max_ms=max_ms,
        last_end=last_end,
    )


def make_ops(
    mode: str, path: str, sync: str, clients: list[int], writer: Any
) -> tuple[list[Op], Op]:
    """One operation per client id, and a cleanup to run after the loop."""
    if mode == "mpwriter":
        return [partial(mp_insert, writer, c) for c in clients], lambda: None
    if mode == "thread":
        tw = ThreadWriter(path, sync)
        return [partial(tw.insert, c) for c in clients], tw.close
    conn = open_connection(path, sync)  # raw / naive: one connection per process
    return [partial(insert_in_own_transaction, conn, c) for c in clients], conn.close


def mp_insert(writer: Any, client: int) -> None:
    writer.execute(INSERT, (client, payload(client)))


def client_main(
    mode: str,
    path: str,
    sync: str,
    clients: list[int],
    out: Connection,
    start: Any,
    shared_deadline: Any,
    writer: Any = None,
) -> None:
    """Process target: set up, say "ready", wait for the start, run, send summaries."""
    try:
        ops, cleanup = make_ops(mode, path, sync, clients, writer)
    except Exception as exc:
        out.send(("error", error_key(exc)))
        return
    out.send(("ready", None))
    if not start.wait(START_TIMEOUT):
        out.send(("error", "no start signal"))
        return
    deadline = shared_deadline.value
    summaries: list[Summary | None] = [None] * len(ops)

    def run(i: int) -> None:
        summaries[i] = drive(clients[i], ops[i], deadline)

    if len(ops) == 1:
        run(0)
    else:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ops))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(deadline - time.monotonic() + OP_TIMEOUT + 5)
    cleanup()
    out.send(("done", [s for s in summaries if s is not None]))


def weighted_percentile(groups: list[tuple[list[float], float]], q: float) -> float:
    """Percentile ``q`` (0..1) over sorted sample lists, each with a weight per sample
    (count / len(samples), since large clients are down-sampled)."""
    pairs = sorted((x, w) for samples, w in groups for x in samples)
    total = sum(w for _, w in pairs)
    if not pairs:
        return float("nan")
    acc = 0.0
    for x, w in pairs:
        acc += w
        if acc >= q * total:
            return x
    return pairs[-1][0]


def aggregate(
    mode: str,
    sync: str,
    clients: int,
    summaries: list[Summary],
    began: float,
    rows: int,
    stats: dict[str, Any] | None,
    problems: list[str],
) -> dict[str, Any]:
    """One run's figures from its clients' summaries."""
    counts = [s["count"] for s in summaries]
    if len(summaries) != clients:
        problems = [*problems, f"only {len(summaries)}/{clients} clients reported"]
    acked = sum(counts)
    elapsed = max((s["last_end"] for s in summaries), default=began) - began
    groups = [(s["samples"], s["count"] / len(s["samples"])) for s in summaries if s["samples"]]
    errors: Counter[str] = Counter()
    for s in summaries:
        errors.update(s["errors"])
    return {
        "mode": mode,
        "sync": sync,
        "clients": clients,
        "acked": acked,
        "rows": rows,
        "elapsed_s": elapsed,
        "writes_per_s": acked / elapsed if elapsed > 0 else 0.0,
        "p50_ms": weighted_percentile(groups, 0.50),
        "p99_ms": weighted_percentile(groups, 0.99),
        "max_ms": max((s["max_ms"] for s in summaries), default=float("nan")),
        "fairness": min(counts) / most if (most := max(counts, default=0)) else 0.0,
        "per_client": counts,
        "errors": dict(errors),
        "mean_batch_size": stats["mean_batch_size"] if stats else None,
        "writer_stats": stats,
        "problems": problems,
    }
