"""Where a request's CPU goes: profile the writer, or one caller, under load.

N forked clients run closed loops of single-row inserts (bench_insert's
INSERT) against a fork-started writer (the real SQLite engine, or the echo
engine with --echo), and one process is profiled while they run:

  --profiler perf     `perf record` on that process; prints the share of its
                      CPU samples per library (kernel, libpython, libsqlite3,
                      ...) and its hottest symbols. Needs perf (Linux).
  --profiler cprofile cProfile inside that process; prints Python calls per
                      request and the functions with the most own time
                      (cProfile's times are wall-clock and inflated by its
                      own overhead: read them as proportions).

Usage (from the repository root):

  PYTHONPATH=. python3 tools/profile_writer.py --profiler perf
  PYTHONPATH=. python3 tools/profile_writer.py --profiler perf --side client
  PYTHONPATH=. python3 tools/profile_writer.py --profiler cprofile --echo
  PYTHONPATH=. python3 tools/profile_writer.py --profiler cprofile --database URL
      # a PostgreSQL writer (bench_pg's INSERT, on a fresh table in that database)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import multiprocessing
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import _benchlib as lib
import bench_insert
import bench_pg
import mpwriter
from mpwriter._writer import loop as writer_loop

PAYLOAD = "x" * 100


def client(
    writer: mpwriter.Writer,
    requests: int,
    go: Connection,
    done: Connection,
    profile: str,
    postgres: bool,
) -> None:
    """A forked client: wait for ``go``, insert ``requests`` rows, report."""
    go.recv()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    for seq in range(requests):
        if postgres:
            writer.execute(bench_pg.INSERT, (0, seq, PAYLOAD))
        else:
            writer.execute(bench_insert.INSERT, (0, PAYLOAD))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    done.send(requests)


def profiled_run(original: Callable[[Any], None], path: str) -> Callable[[Any], None]:
    """``WriterLoop.run`` under cProfile, dumped to ``path`` when it returns."""

    def run(self: Any) -> None:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            original(self)
        finally:
            profiler.disable()
            profiler.dump_stats(path)

    return run


def print_perf(data: str, top: int) -> None:
    for sort in ("dso", "sym"):
        report = subprocess.run(
            ["perf", "report", "-i", data, "--no-children", "-g", "none", "-q", "--sort", sort],
            capture_output=True,
            text=True,
            check=True,
        )
        lines = [line for line in report.stdout.splitlines() if line.strip()]
        print(f"\nshare of CPU samples by {'library' if sort == 'dso' else 'symbol'}:")
        print("\n".join(lines[:top]))


def print_cprofile(path: str, requests: int, top: int) -> None:
    stats = pstats.Stats(path)
    print(f"\nPython calls per request: {stats.total_calls / requests:.1f}")  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4000, help="per client")
    parser.add_argument("--profiler", choices=("perf", "cprofile"), default="perf")
    parser.add_argument("--side", choices=("writer", "client"), default="writer")
    parser.add_argument("--echo", action="store_true", help="the echo engine, no database")
    parser.add_argument("--sync", default="NORMAL")
    parser.add_argument("--database", help="a PostgreSQL URL: profile a PostgreSQL writer")
    parser.add_argument("--top", type=int, default=25, help="rows of each table")
    args = parser.parse_args()
    if args.profiler == "perf" and shutil.which("perf") is None:
        sys.exit("perf is not installed")
    print("machine:", ", ".join(f"{k}={v}" for k, v in lib.machine(tempfile.gettempdir()).items()))
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "profile")
        if args.profiler == "cprofile" and args.side == "writer":
            # Forked writers inherit this process's class: only they run it.
            writer_loop.WriterLoop.run = profiled_run(  # type: ignore[method-assign,assignment]
                writer_loop.WriterLoop.run, output
            )
        engine = bench_insert.echo_runner() if args.echo else contextlib.nullcontext()
        # A fresh table: the rows of earlier profiles do not slow this one.
        pg_schema = f"DROP TABLE IF EXISTS items; {bench_pg.SCHEMA}"
        fork = multiprocessing.get_context("fork")
        with (
            engine,
            (
                mpwriter.start(args.database, context="fork", init=pg_schema, timeout=60)
                if args.database
                else lib.start_writer(
                    os.path.join(directory, "profile.db"), args.sync, init=bench_insert.SCHEMA
                )
            ) as writer,
        ):
            processes, gos, dones = [], [], []
            for number in range(args.clients):
                go_r, go_w = fork.Pipe(duplex=False)
                done_r, done_w = fork.Pipe(duplex=False)
                profile = output if args.profiler == "cprofile" and args.side == "client" else ""
                process = fork.Process(
                    target=client,
                    args=(
                        writer,
                        args.requests,
                        go_r,
                        done_w,
                        profile if number == 0 else "",
                        bool(args.database),
                    ),
                )
                process.start()
                processes.append(process)
                gos.append(go_w)
                dones.append(done_r)
            target = writer.stats()["pid"] if args.side == "writer" else processes[0].pid
            recorder = None
            if args.profiler == "perf":
                recorder = subprocess.Popen(
                    ["perf", "record", "-q", "-g", "-o", output, "-p", str(target)],
                    stderr=subprocess.DEVNULL,
                )
            for go in gos:
                go.send(True)
            for done in dones:
                if not wait([done], 300):
                    raise TimeoutError("a client did not finish within 300 s")
                done.recv()
            if recorder is not None:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(timeout=60)
            stats = writer.stats()
            for process in processes:
                lib.reap(process)
        where = "echo" if args.echo else "PostgreSQL" if args.database else f"SQLite {args.sync}"
        print(
            f"{args.clients} clients x {args.requests} inserts, {where} writer,"
            f" mean batch {stats['mean_batch_size']:.1f}; profiled: the {args.side}"
        )
        if args.profiler == "perf":
            print_perf(output, args.top)
        else:
            requests = stats["requests"] if args.side == "writer" else args.requests
            print_cprofile(output, requests, args.top)


if __name__ == "__main__":
    main()
