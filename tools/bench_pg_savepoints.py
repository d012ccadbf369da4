"""PostgreSQL: one pipelined transaction of single-row inserts, with and without a savepoint each.

Why the PostgreSQL engine runs its error-free batches without savepoints
(mpwriter/_writer/postgres.py) and replays a failed batch in savepoints
instead. Rounds of --seconds per variant, interleaved; prints the medians.

  PYTHONPATH=. python3 tools/bench_pg_savepoints.py --database postgresql://postgres@127.0.0.1/postgres
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import psycopg

TABLE = "mpwriter_bench_savepoints"


def one_batch(conn: psycopg.Connection[Any], size: int, savepoints: bool) -> None:
    with conn.pipeline():
        conn.execute("BEGIN")
        for seq in range(size):
            if savepoints:
                conn.execute("SAVEPOINT request")
            conn.execute(f"INSERT INTO {TABLE}(client, seq) VALUES (%s, %s)", (1, seq))
            if savepoints:
                conn.execute("RELEASE request")
    conn.execute("COMMIT")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--database", required=True, help="postgresql:// URL")
    parser.add_argument("--sizes", default="16,64", help="requests per batch (16,64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    with psycopg.connect(args.database, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id BIGSERIAL PRIMARY KEY, client INT, seq INT)")
        try:
            for size in (int(s) for s in args.sizes.split(",")):
                rates: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.rounds):
                    for savepoints in (False, True):
                        rows = 0
                        began = time.perf_counter()
                        while time.perf_counter() - began < args.seconds:
                            one_batch(conn, size, savepoints)
                            rows += size
                        rates[savepoints].append(rows / (time.perf_counter() - began))
                for savepoints, label in ((False, "no savepoints"), (True, "savepoint each")):
                    median = statistics.median(rates[savepoints])
                    print(f"batches of {size}: {label:15} {median:9,.0f} rows/s (median)")
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}")


if __name__ == "__main__":
    main()
