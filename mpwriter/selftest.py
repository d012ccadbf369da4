"""``python -m mpwriter.selftest``: prove mpwriter works on this machine.

Starts a writer on a temporary database, then many client processes, which
begin writing together once every one of them is ready (so that the rate
does not include starting them, which under spawn takes longer than the
writes), each doing business writes: a task row plus an audit row that
references it (FOREIGN KEY), atomically. Afterwards it verifies that every
write succeeded, no "database is locked" appeared, no audit row is orphaned,
the row counts equal the acknowledgements, and, on SQLite, that ``PRAGMA
integrity_check`` is ok. It prints throughput, latency percentiles and the
requests per group commit; the text shows the same figures as ``--json``.

Exit status 0 only when everything verified. ``--json`` prints one JSON
object instead of text. ``--database postgresql://...`` runs it against a
PostgreSQL server instead: in a database it creates for the run and drops
afterwards (the user needs CREATEDB).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.connection import Connection, wait
from typing import Any

from ._caller.attached import attach, get_writer
from ._caller.handle import Writer
from ._caller.reader import reader
from ._owner.owner import start
from ._wire.address import is_server_url

SCHEMA = """
CREATE TABLE IF NOT EXISTS task (
    id INTEGER PRIMARY KEY,
    client INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (client, seq)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL REFERENCES task(id),
    note TEXT NOT NULL
);
"""

# The same tables on PostgreSQL (its engine runs SQLite's "?" placeholders as they are).
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS task (
    id SERIAL PRIMARY KEY,
    client INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (client, seq)
);
CREATE TABLE IF NOT EXISTS audit (
    id SERIAL PRIMARY KEY,
    task_id INTEGER NOT NULL REFERENCES task(id),
    note TEXT NOT NULL
);
"""


def add_task(conn: sqlite3.Connection, client: int, seq: int, body: str) -> int:
    """The business write, run inside the writer: a task and its audit row."""
    if hasattr(conn, "native"):  # PostgreSQL has no lastrowid: RETURNING
        task_id = conn.execute(
            "INSERT INTO task(client, seq, body) VALUES (?, ?, ?) RETURNING id", (client, seq, body)
        ).fetchone()[0]
    else:
        task_id = conn.execute(
            "INSERT INTO task(client, seq, body) VALUES (?, ?, ?)", (client, seq, body)
        ).lastrowid
    conn.execute("INSERT INTO audit(task_id, note) VALUES (?, 'created')", (task_id,))
    return int(task_id or 0)


def _client(client: int, writes: int, go: Any, report: Connection) -> None:
    writer = get_writer()
    postgres = is_server_url(writer.path)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    report.send(READY)
    if not go.wait(READY_TIMEOUT):  # everyone starts together
        errors["the start signal never came"] += 1
    for seq in range(writes):
        began = time.perf_counter()
        try:
            if seq % 2:
                writer.call(add_task, client, seq, "x" * 64)
            else:
                # The same business write, sent as a buffered transaction.
                with writer.transaction() as tx:
                    tx.execute(
                        "INSERT INTO task(client, seq, body) VALUES (?, ?, ?)",
                        (client, seq, "y" * 64),
                    )
                    new_id = "lastval()" if postgres else "last_insert_rowid()"
                    tx.execute(f"INSERT INTO audit(task_id, note) VALUES ({new_id}, 'created')")
        except Exception as exc:
            errors[f"{type(exc).__name__}: {exc}"] += 1
            continue
        latencies.append(time.perf_counter() - began)
    report.send((latencies, dict(errors)))


READY = "ready"
# How long the self-test waits for every client process to be ready (spawn
# starts 100 interpreters), and a client for the start signal.
READY_TIMEOUT = 120.0


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run(
    clients: int, writes: int, context: str | None, *, live: bool, database: str | None = None
) -> dict[str, Any]:
    """Run the self-test; return its figures and verdicts."""
    ctx = multiprocessing.get_context(context)
    if database is not None:
        return _run_postgres(database, ctx, clients, writes, live)
    with tempfile.TemporaryDirectory(prefix="mpwriter-selftest-") as directory:
        path = os.path.join(directory, "selftest.db")
        with start(path, init=SCHEMA, context=ctx, timeout=60.0) as writer:
            figures = _drive(writer, ctx, clients, writes, live)
            figures["writer"] = writer.stats()
        figures.update(_verify(path, figures["acknowledged"]))
    return figures


def _run_postgres(server: str, ctx: Any, clients: int, writes: int, live: bool) -> dict[str, Any]:
    import secrets

    import psycopg

    name = f"mpwriter_selftest_{secrets.token_hex(4)}"
    url = server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            with start(url, init=PG_SCHEMA, context=ctx, timeout=60.0) as writer:
                figures = _drive(writer, ctx, clients, writes, live)
                figures["writer"] = writer.stats()
            figures.update(_verify(url, figures["acknowledged"]))
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return figures


def _drive(writer: Writer, ctx: Any, clients: int, writes: int, live: bool) -> dict[str, Any]:
    go = ctx.Event()
    reports, processes = [], []
    for client in range(clients):
        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_child_main, args=(writer, client, writes, go, send), daemon=True
        )
        process.start()
        send.close()
        reports.append(receive)
        processes.append(process)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    waiting = _wait_until_ready(reports, errors)
    began = time.perf_counter()  # every client that lives is ready: the rate starts now
    go.set()
    deadline = time.monotonic() + 600
    while waiting and time.monotonic() < deadline:
        for ready in wait(list(waiting), timeout=0.25):
            assert isinstance(ready, Connection)
            try:
                got, errs = ready.recv()
            except EOFError:
                errors["client process died"] += 1
            else:
                latencies.extend(got)
                errors.update(errs)
            waiting.discard(ready)
        if live:
            done = writer.stats()["requests"]
            print(f"\r  {done} of {clients * writes} writes committed", end="", flush=True)
    elapsed = time.perf_counter() - began
    if live:
        print()
    for process in processes:
        process.join(5)
        if process.exitcode is None:
            process.kill()
            process.join(5)
    latencies.sort()
    return {
        "clients": clients,
        "writes_per_client": writes,
        "attempted": clients * writes,
        "acknowledged": len(latencies),
        "errors": dict(errors),
        "locked_errors": sum(n for msg, n in errors.items() if "locked" in msg),
        "seconds": elapsed,
        "writes_per_second": len(latencies) / elapsed if elapsed else 0.0,
        "latency_ms": {
            "p50": 1000 * _percentile(latencies, 0.50),
            "p99": 1000 * _percentile(latencies, 0.99),
            "max": 1000 * (latencies[-1] if latencies else 0.0),
            "mean": 1000 * (statistics.fmean(latencies) if latencies else 0.0),
        },
    }


def _wait_until_ready(reports: list[Connection], errors: Counter[str]) -> set[Connection]:
    """Wait for each client's READY (or its death); return the pipes of those that are ready."""
    starting = set(reports)
    ready: set[Connection] = set()
    deadline = time.monotonic() + READY_TIMEOUT
    while starting and time.monotonic() < deadline:
        for pipe in wait(list(starting), timeout=deadline - time.monotonic()):
            assert isinstance(pipe, Connection)
            starting.discard(pipe)
            try:
                message = pipe.recv()
            except EOFError:
                errors["client process died before it was ready"] += 1
                continue
            assert message == READY, message
            ready.add(pipe)
    if starting:
        errors[f"client process not ready within {READY_TIMEOUT:.0f} s"] += len(starting)
    return ready


def _child_main(writer: Writer, client: int, writes: int, go: Any, report: Connection) -> None:
    attach(writer)
    _client(client, writes, go, report)


def _verify(path: str, acknowledged: int) -> dict[str, Any]:
    with reader(path) as conn:
        tasks = conn.execute("SELECT count(*) FROM task").fetchone()[0]
        audits = conn.execute("SELECT count(*) FROM audit").fetchone()[0]
        orphans = conn.execute(
            "SELECT count(*) FROM audit LEFT JOIN task ON task.id = audit.task_id"
            " WHERE task.id IS NULL"
        ).fetchone()[0]
        postgres = is_server_url(path)
        # PostgreSQL has no integrity_check: none is run, and none is claimed.
        integrity = None if postgres else conn.execute("PRAGMA integrity_check").fetchone()[0]
    return {"task_rows": tasks, "audit_rows": audits, "orphans": orphans, "integrity": integrity}


def verdicts(figures: dict[str, Any]) -> dict[str, bool]:
    """The checks, by name; SQLite's own (locking, integrity_check) only on SQLite."""
    acknowledged = figures["acknowledged"]
    sqlite = figures["integrity"] is not None
    checks = {
        "every write succeeded": acknowledged == figures["attempted"] and not figures["errors"]
    }
    if sqlite:  # SQLite's failure of concurrent writers; a server has no such error
        checks['no "database is locked"'] = figures["locked_errors"] == 0
    checks["no orphaned audit rows"] = figures["orphans"] == 0
    checks["rows equal acknowledgements"] = (
        figures["task_rows"] == acknowledged and figures["audit_rows"] == acknowledged
    )
    if sqlite:
        checks["integrity_check ok"] = figures["integrity"] == "ok"
    return checks


def group_commit(writer: dict[str, Any]) -> dict[str, Any]:
    """Requests, batches, commits and requests per commit, from the writer's stats."""
    commits = writer["commits"]
    return {
        "requests": writer["requests"],
        "batches": writer["batches"],
        "commits": commits,
        "requests_per_commit": writer["requests"] / commits if commits else 0.0,
    }


def _engine_line(database: str | None) -> str:
    if database is None:
        return f"SQLite {sqlite3.sqlite_version}"
    import psycopg

    with psycopg.connect(database, connect_timeout=10) as conn:
        version = conn.info.server_version  # e.g. 150004
    return f"PostgreSQL {version // 10000}.{version % 10000} (psycopg {psycopg.__version__})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpwriter.selftest", description=__doc__)
    parser.add_argument("--clients", type=int, default=100, help="client processes (100)")
    parser.add_argument("--writes", type=int, default=50, help="writes per client (50)")
    parser.add_argument("--context", choices=["fork", "spawn", "forkserver"], default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--database", default=None, help="a postgresql:// URL to test against (default: SQLite)"
    )
    args = parser.parse_args(argv)
    if not args.json:
        print(
            f"mpwriter self-test: {args.clients} processes x {args.writes} writes"
            f" | Python {platform.python_version()}, {_engine_line(args.database)},"
            f" {os.cpu_count()} cores, {platform.system()}"
        )
    figures = run(
        args.clients,
        args.writes,
        args.context,
        live=sys.stdout.isatty() and not args.json,
        database=args.database,
    )
    figures["group_commit"] = group_commit(figures["writer"])
    checks = verdicts(figures)
    ok = all(checks.values())
    if args.json:
        print(json.dumps({**figures, "checks": checks, "ok": ok}, indent=2, sort_keys=True))
        return 0 if ok else 1
    latency = figures["latency_ms"]
    commits = figures["group_commit"]
    print(
        f"  {figures['acknowledged']} writes in {figures['seconds']:.2f} s:"
        f" {figures['writes_per_second']:,.0f} writes/s"
    )
    print(
        f"  latency p50 {latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms,"
        f" max {latency['max']:.2f} ms"
    )
    print(
        f"  group commit: {commits['requests']} requests in {commits['commits']} commits,"
        f" {commits['requests_per_commit']:.1f} requests per commit"
    )
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAILED'}] {name}")
    for message, count in sorted(figures["errors"].items()):
        print(f"    {count} x {message}")
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
