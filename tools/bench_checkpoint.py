"""Where the WAL checkpoint lands, in-process: the writer's engine without the transport.

Runs batches of single-row inserts straight through the SQLite engine (no
pipes, no other processes, so little scheduling noise) and times each
batch's `run` -- what the batch's callers wait for -- apart from the upkeep
after it:

  inline   SQLite's autocheckpoint (every 1,000 frames) inside the COMMIT that
           crosses it, as before issue 13: no `tidy`
  busy     autocheckpoint off; `tidy(idle=False)` after every batch, as under
           sustained load (the backstop checkpoints after the replies)
  idle     autocheckpoint off; `tidy(idle=True)` after every batch, as when
           the queue empties after each batch

Usage: PYTHONPATH=. python3 tools/bench_checkpoint.py [--batches 6000] [--batch 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from types import SimpleNamespace

from bench_insert import INSERT, SCHEMA, payload
from mpwriter._wire.frames import Kind, Request
from mpwriter._writer import sqlite
from mpwriter._writer.batch import Counters, Work
from mpwriter._writer.sqlite import open_sqlite_engine

POLICIES = ("inline", "busy", "idle")


def run_policy(policy: str, sync: str, batches: int, size: int, base_dir: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="mpwbench-ckpt-", dir=base_dir) as tmp:
        state = SimpleNamespace(busy_until=0.0)
        previous = signal.getsignal(signal.SIGALRM)
        engine = open_sqlite_engine(
            os.path.join(tmp, "c.db"), sync, SCHEMA, Counters(), state, None
        )
        if policy == "inline":
            engine._conn.execute("PRAGMA wal_autocheckpoint=1000")  # SQLite's default
        runs: list[float] = []
        after: list[float] = []
        began = time.perf_counter()
        try:
            for b in range(batches):
                deadline = time.monotonic() + 60
                batch = [
                    Work(
                        Request(Kind.EXECUTE, 1, b * size + i, 0, b""),
                        deadline,
                        0.0,
                        (INSERT, (i, payload(i))),
                    )
                    for i in range(size)
                ]
                t0 = time.perf_counter()
                engine.run(batch)
                t1 = time.perf_counter()
                if policy != "inline":
                    engine.tidy(idle=policy == "idle")
                runs.append(t1 - t0)
                after.append(time.perf_counter() - t1)
            elapsed = time.perf_counter() - began
        finally:
            engine.close()
            signal.signal(signal.SIGALRM, previous)
    ordered = sorted(runs)
    return {
        "batches_per_s": batches / elapsed,
        "rows_per_s": batches * size / elapsed,
        "run_p50_ms": 1000 * statistics.median(ordered),
        "run_p999_ms": 1000 * ordered[int(0.999 * (len(ordered) - 1))],
        "run_max_ms": 1000 * ordered[-1],
        "run_over_5ms": sum(t > 0.005 for t in runs),
        "tidy_max_ms": 1000 * max(after),
        "tidy_total_s": sum(after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batches", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=5, help="inserts per batch")
    parser.add_argument("--sync", default="NORMAL,FULL")
    parser.add_argument("--rounds", type=int, default=3, help="policies interleaved per round")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument(
        "--backstop", type=int, help="frames: try another BACKSTOP_CHECKPOINT_FRAMES"
    )
    args = parser.parse_args()
    if args.backstop:
        sqlite.BACKSTOP_CHECKPOINT_FRAMES = args.backstop
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for sync in args.sync.split(","):
        for _ in range(args.rounds):
            for policy in POLICIES:
                figures = run_policy(policy, sync, args.batches, args.batch, args.dir)
                results.setdefault((sync, policy), []).append(figures)
    keys = list(next(iter(results.values()))[0])
    print(f"medians of {args.rounds} rounds, {args.batches} batches of {args.batch} inserts")
    print(f"{'sync':6} {'policy':6} " + " ".join(f"{k:>13}" for k in keys))
    for (sync, policy), runs in results.items():
        cells = [statistics.median(r[k] for r in runs) for k in keys]
        print(f"{sync:6} {policy:6} " + " ".join(f"{c:13.2f}" for c in cells))


if __name__ == "__main__":
    main()
