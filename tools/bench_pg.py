"""PostgreSQL: mpwriter against one connection per process (naive), single-row inserts.

Closed loop: N client processes each insert one row after another for
--duration seconds.

  mpwriter  every client sends its insert to one mpwriter writer (one server
            connection; group commit, a transaction per batch)
  naive     every client holds its own psycopg connection and commits each
            insert (autocommit); past max_connections, connects fail and count
            as errors (the client retries after 10 ms)

Per run: throughput (acknowledged inserts/s), p99 and max latency, errors,
and the most server connections seen on the benchmark's database
(pg_stat_activity, sampled every 50 ms). Each run gets a fresh table. Usage:

  PYTHONPATH=. python3 tools/bench.py --database postgresql://postgres@127.0.0.1:5432/postgres
  PYTHONPATH=. python3 tools/bench_pg.py --database URL --clients 8,16,64,128 --duration 3

After the table: mpwriter/naive per client count, and issue 22's targets
(>= 1.4x at 16 clients, >= 2.5x at 64, zero errors, p99 at 16 < 10 ms).

The database named in the URL is not touched: the benchmark creates its own
(mpwriter_bench_<random>) on that server and drops it at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import secrets
import statistics
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any

import psycopg

import mpwriter

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS items (id BIGSERIAL PRIMARY KEY, client INT, seq INT, payload TEXT)"
)
INSERT = "INSERT INTO items(client, seq, payload) VALUES (?, ?, ?)"
NATIVE_INSERT = "INSERT INTO items(client, seq, payload) VALUES (%s, %s, %s)"
PAYLOAD = "x" * 64


def _client(mode: str, target: Any, number: int, go: Any, duration: float, out: Connection) -> None:
    latencies: list[float] = []
    errors = 0
    conn: psycopg.Connection[Any] | None = None
    if not go.wait(60):
        out.send((latencies, 1))
        return
    until = time.monotonic() + duration  # from the common start, however long forking took
    seq = 0
    while time.monotonic() < until:
        seq += 1
        began = time.perf_counter()
        try:
            if mode == "mpwriter":
                target.execute(INSERT, (number, seq, PAYLOAD), timeout=30)
            else:
                if conn is None:
                    conn = psycopg.connect(target, autocommit=True, connect_timeout=10)
                conn.execute(NATIVE_INSERT, (number, seq, PAYLOAD))
        except (mpwriter.Error, psycopg.Error):
            errors += 1
            if conn is not None and conn.broken:
                conn = None
            time.sleep(0.01)  # sleep-ok: a naive client's retry pause after a failure
            continue
        latencies.append(time.perf_counter() - began)
    if conn is not None:
        conn.close()
    out.send((latencies, errors))


def _connections(monitor: psycopg.Connection[Any], dbname: str) -> int:
    row = monitor.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    ).fetchone()
    return int(row[0]) if row else 0


def run_once(mode: str, url: str, clients: int, duration: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as setup:
        setup.execute("DROP TABLE IF EXISTS items")
        setup.execute(SCHEMA)
    writer = mpwriter.start(url, context=ctx, timeout=30) if mode == "mpwriter" else None
    target: Any = writer if writer is not None else url
    go = ctx.Event()
    pipes, processes = [], []
    try:
        for number in range(clients):
            receive, send = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=_client, args=(mode, target, number, go, duration, send), daemon=True
            )
            process.start()
            send.close()
            pipes.append(receive)
            processes.append(process)
        peak = 0
        with psycopg.connect(url, autocommit=True) as monitor:
            began = time.monotonic()
            go.set()
            while time.monotonic() < began + duration:
                peak = max(peak, _connections(monitor, dbname))
                time.sleep(0.05)  # sleep-ok: the sampling interval of pg_stat_activity
        latencies: list[float] = []
        errors = 0
        waiting = set(pipes)
        deadline = time.monotonic() + 60
        while waiting and time.monotonic() < deadline:
            for ready in wait(list(waiting), timeout=1.0):
                assert isinstance(ready, Connection)
                got, failed = ready.recv()
                latencies.extend(got)
                errors += failed
                waiting.discard(ready)
        errors += len(waiting)  # a client that never reported
        # Every client ran for ``duration`` from the common start (plus its last call).
        elapsed = duration
    finally:
        for process in processes:
            process.join(10)
            if process.exitcode is None:
                process.kill()
                process.join(5)
        if writer is not None:
            writer.close(timeout=30)
    latencies.sort()
    with psycopg.connect(url) as check:
        row = check.execute("SELECT count(*) FROM items").fetchone()
        stored = int(row[0]) if row else 0
    return {
        "mode": mode,
        "clients": clients,
        "per_second": len(latencies) / elapsed,
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0,
        "max_ms": 1000 * latencies[-1] if latencies else 0.0,
        "median_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
        "errors": errors,
        "connections": peak,
        "acknowledged": len(latencies),
        "stored": stored,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", required=True, help="postgresql:// URL of the server")
    parser.add_argument("--clients", default="8,16,64,128")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run (3)")
    parser.add_argument("--modes", default="mpwriter,naive")
    args = parser.parse_args(argv)
    name = f"mpwriter_bench_{secrets.token_hex(4)}"
    url = args.database.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(args.database, autocommit=True) as admin:
        server = admin.execute("SHOW server_version").fetchone()
        limit = admin.execute("SHOW max_connections").fetchone()
        fsync = admin.execute("SHOW fsync").fetchone()
        admin.execute(f"CREATE DATABASE {name}")  # type: ignore[call-overload]
        try:
            print(
                f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()},"
                f" PostgreSQL {server[0] if server else '?'}, max_connections"
                f" {limit[0] if limit else '?'}, fsync {fsync[0] if fsync else '?'};"
                f" {args.duration:g} s per run"
            )
            print("| clients | mode | inserts/s | p99 ms | max ms | errors | server connections |")
            print("|---:|---|---:|---:|---:|---:|---:|")
            problems = 0
            results: dict[tuple[str, int], dict[str, Any]] = {}
            for clients in (int(c) for c in args.clients.split(",")):
                for mode in args.modes.split(","):
                    r = results[(mode, clients)] = run_once(mode, url, clients, args.duration)
                    print(
                        f"| {clients} | {mode} | {r['per_second']:,.0f} | {r['p99_ms']:.1f}"
                        f" | {r['max_ms']:.1f} | {r['errors']} | {r['connections']} |",
                        flush=True,
                    )
                    if r["stored"] < r["acknowledged"]:
                        print(f"  PROBLEM: {r['acknowledged']} acknowledged, {r['stored']} stored")
                        problems += 1
            print_targets(results)
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[call-overload]
    return 1 if problems else 0


TARGETS = {16: 1.4, 64: 2.5}  # mpwriter / naive inserts per second (issue 22)
P99_MS_16 = 10.0


def print_targets(results: dict[tuple[str, int], dict[str, Any]]) -> None:
    """The ratios mpwriter/naive of this run, and the targets they meet or not."""
    ratios = [
        f"{clients} clients x{results[('mpwriter', clients)]['per_second'] / r['per_second']:.2f}"
        for (mode, clients), r in results.items()
        if mode == "naive" and ("mpwriter", clients) in results and r["per_second"]
    ]
    print("\nmpwriter/naive: " + ", ".join(ratios))
    print("targets:")
    for clients, bound in TARGETS.items():
        mp, naive = results.get(("mpwriter", clients)), results.get(("naive", clients))
        if mp is None or naive is None or not naive["per_second"]:
            print(f"  not judged    {clients} clients >= {bound}x naive (not measured)")
            continue
        ratio = mp["per_second"] / naive["per_second"]
        verdict = "met" if ratio >= bound else "NOT MET"
        print(f"  {verdict:12}  {clients} clients >= {bound}x naive: x{ratio:.2f}")
    mp16 = results.get(("mpwriter", 16))
    if mp16 is not None:
        verdict = "met" if mp16["p99_ms"] < P99_MS_16 else "NOT MET"
        print(f"  {verdict:12}  p99 at 16 clients < {P99_MS_16:g} ms: {mp16['p99_ms']:.1f} ms")
    errors = sum(r["errors"] for (mode, _), r in results.items() if mode == "mpwriter")
    print(f"  {'met' if not errors else 'NOT MET':12}  mpwriter zero errors: {errors}")


if __name__ == "__main__":
    sys.exit(main())
