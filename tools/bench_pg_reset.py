"""PostgreSQL: what the session guard and reset sent with every COMMIT cost.

The engine sends ``SET LOCAL synchronous_commit`` before each COMMIT and
``RESET SESSION AUTHORIZATION; RESET ALL`` after it, in the COMMIT's
pipeline (see `mpwriter._writer.postgres.PostgresEngine._commit`). This
times batches of 16 single-row inserts sent the way the engine sends them,
with and without those statements, in alternating rounds; it prints the
machine and the medians and minimums per batch. Usage:

  PYTHONPATH=. python3 tools/bench_pg_reset.py --database postgresql://postgres@127.0.0.1:5432/postgres

It creates and drops a table ``mpwriter_bench_reset`` in that database.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import psycopg

TABLE = "mpwriter_bench_reset"


def batch(conn: psycopg.Connection[Any], size: int, reset: bool) -> None:
    with conn.pipeline():
        conn.execute("BEGIN")
        conn.execute("SELECT set_config('statement_timeout', '5000', true)")
        for i in range(size):
            conn.execute(f"INSERT INTO {TABLE}(x) VALUES (%s)", (i,))
    with conn.pipeline():
        if reset:
            conn.execute("SET LOCAL synchronous_commit = 'on'")
        conn.execute("COMMIT")
        if reset:
            conn.execute("RESET SESSION AUTHORIZATION")
            conn.execute("RESET ALL")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", required=True, help="postgresql:// URL")
    parser.add_argument("--size", type=int, default=16, help="inserts per batch (16)")
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--batches", type=int, default=50, help="batches per round (50)")
    args = parser.parse_args()
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    with psycopg.connect(args.database, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id serial PRIMARY KEY, x int)")
        try:
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for reset in (False, True):
                    started = time.perf_counter()
                    for _ in range(args.batches):
                        batch(conn, args.size, reset)
                    times[reset].append((time.perf_counter() - started) / args.batches * 1000)
        finally:
            conn.execute(f"DROP TABLE {TABLE}")
    for reset, samples in times.items():
        name = "with guard and reset" if reset else "COMMIT alone"
        print(
            f"{name:22} median {statistics.median(samples):.3f} ms,"
            f" min {min(samples):.3f} ms per batch of {args.size}"
        )


if __name__ == "__main__":
    main()
