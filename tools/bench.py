"""Closed-loop single-row insert benchmark: mpwriter against the usual alternatives.

Every client inserts one ~100-byte row at a time into
``bench(id INTEGER PRIMARY KEY, client INTEGER, payload TEXT)`` and waits for
the commit before the next one. Modes, each on a fresh WAL database:

  raw       one process, one connection, BEGIN IMMEDIATE ... COMMIT per insert
            (run with one client only: the single-connection ceiling)
  naive     N processes, a connection each, busy_timeout=5000, BEGIN IMMEDIATE
  thread    one process: a writer thread fed by a queue.Queue, N caller threads
            (one transaction per request: no group commit)
  mpwriter  N forked processes sharing one mpwriter.Writer (group commit)

Each configuration runs --runs times; modes are interleaved within a round, and
the table shows medians. Usage (from the repository root):

  PYTHONPATH=. python3 tools/bench.py
  PYTHONPATH=. python3 tools/bench.py --clients 1,8 --sync NORMAL,FULL --duration 3 --runs 3
  PYTHONPATH=. python3 tools/bench.py --modes raw,mpwriter --json tools/results/bench.json
  PYTHONPATH=. python3 tools/bench.py --dir /mnt/ssd/tmp   # where the databases go
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from multiprocessing.connection import Connection, wait
from typing import Any

import _benchlib as lib
import mpwriter

MODES = ("raw", "naive", "thread", "mpwriter")
READY_TIMEOUT = 30.0
RESULT_GRACE = lib.OP_TIMEOUT + lib.BUSY_TIMEOUT_MS / 1000 + 10.0  # past the deadline
JOIN_TIMEOUT = 5.0
CTX = multiprocessing.get_context("fork")

Run = dict[str, Any]


# -- machine ----------------------------------------------------------------------


def filesystem_of(path: str) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts; Linux)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _dev, point, fstype = line.split()[:3]
                if os.path.realpath(path).startswith(point) and len(point) > len(best):
                    best, kind = point, fstype
    except OSError:
        pass
    return kind


def source_revision() -> str:
    """The git commit of the mpwriter being measured (the code moves between runs)."""
    where = os.path.dirname(os.path.abspath(mpwriter.__file__))
    git = ["git", "-C", where, "describe", "--always", "--dirty"]
    try:
        return subprocess.run(
            git, check=False, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine(base_dir: str) -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "mpwriter": f"{mpwriter.__version__} ({source_revision()})",
        "db_dir": base_dir,
        "db_fs": filesystem_of(base_dir),
    }


# -- one run ----------------------------------------------------------------------


def reap(process: Any) -> str | None:
    """Join with a deadline, then terminate, then kill; describe any trouble."""
    for stop in (None, process.terminate, process.kill):
        if stop is not None:
            stop()
        if wait([process.sentinel], JOIN_TIMEOUT):
            process.join(0)
            return None if stop is None else f"pid {process.pid} had to be {stop.__name__}ed"
    return f"pid {process.pid} would not die"


def collect(pipes: list[Connection], tag: str, timeout: float) -> tuple[list[Any], list[str]]:
    """One ``(tag, value)`` message from every pipe, within ``timeout`` seconds."""
    values: list[Any] = []
    problems: list[str] = []
    pending = list(pipes)
    end = time.monotonic() + timeout
    while pending and (ready := wait(pending, max(0.0, end - time.monotonic()))):
        for pipe in ready:
            assert isinstance(pipe, Connection)
            pending.remove(pipe)
            try:
                got, value = pipe.recv()
            except EOFError:
                problems.append(f"a client died before sending {tag!r}")
                continue
            if got == tag:
                values.append(value)
            else:
                problems.append(f"client said {got}: {value}")
    if pending:
        problems.append(f"{len(pending)} client(s) sent no {tag!r} within {timeout:.0f} s (HANG)")
    return values, problems


def run_clients(
    mode: str, path: str, sync: str, clients: int, duration: float, writer: Any
) -> tuple[list[lib.Summary], float, list[str]]:
    """Start the clients, release them together, gather their summaries."""
    groups = [list(range(clients))] if mode == "thread" else [[c] for c in range(clients)]
    start = CTX.Event()
    deadline = CTX.RawValue("d", 0.0)
    processes, pipes = [], []
    for ids in groups:
        receive, send = CTX.Pipe(duplex=False)
        process = CTX.Process(
            target=lib.client_main,
            daemon=True,
            args=(mode, path, sync, ids, send, start, deadline, writer),
        )
        process.start()
        send.close()
        processes.append(process)
        pipes.append(receive)
    summaries: list[lib.Summary] = []
    began = time.monotonic()
    try:
        _, problems = collect(pipes, "ready", READY_TIMEOUT)
        began = time.monotonic()
        if not problems:
            deadline.value = began + duration
            start.set()
            done, problems = collect(pipes, "done", duration + RESULT_GRACE)
            summaries = [s for group in done for s in group]
    finally:
        problems += [p for p in map(reap, processes) if p]
        for pipe in pipes:
            pipe.close()
    return summaries, began, problems


def count_rows(path: str) -> int:
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        return int(conn.execute("SELECT count(*) FROM bench").fetchone()[0])


def run_once(mode: str, sync: str, clients: int, duration: float, base_dir: str) -> Run:
    with tempfile.TemporaryDirectory(prefix="mpwbench-", dir=base_dir) as tmp:
        path = os.path.join(tmp, "bench.db")
        writer, stats = None, None
        if mode == "mpwriter":
            writer = mpwriter.start(
                path, init=lib.SCHEMA, synchronous=sync, context="fork", timeout=lib.OP_TIMEOUT
            )
        else:
            with closing(lib.open_connection(path, sync)) as conn:
                conn.execute(lib.SCHEMA)
        try:
            summaries, began, problems = run_clients(mode, path, sync, clients, duration, writer)
            if writer is not None:
                try:
                    stats = writer.stats(timeout=lib.OP_TIMEOUT)
                except Exception as exc:
                    problems.append(f"stats() raised {lib.error_key(exc)}")
        finally:
            if writer is not None:
                writer.close(timeout=30.0)
        rows = count_rows(path)
    return lib.aggregate(mode, sync, clients, summaries, began, rows, stats, problems)


# -- rounds and report ----------------------------------------------------------------


def configurations(
    modes: list[str], syncs: list[str], clients: list[int]
) -> list[tuple[str, str, int]]:
    """Interleaved: for each (sync, clients), every mode in turn; raw only at 1 client."""
    out = []
    for sync in syncs:
        if "raw" in modes:
            out.append(("raw", sync, 1))
        for n in clients:
            out += [(m, sync, n) for m in modes if m != "raw"]
    return out


def check(run: Run) -> None:
    """One progress line; a loud line for a row mismatch or a hung/dead client."""
    name = f"{run['mode']} {run['sync']} x{run['clients']}"
    errors = sum(run["errors"].values())
    print(f"  {name:20} {run['writes_per_s']:9.0f} w/s  acked={run['acked']}", end="")
    print(f" rows={run['rows']} errors={errors}", flush=True)
    if run["rows"] != run["acked"]:
        print(f"  *** MISMATCH {name}: {run['rows']} rows, {run['acked']} acknowledged ***")
    for problem in run["problems"]:
        print(f"  *** PROBLEM {name}: {problem} ***", flush=True)


def median_of(runs: list[Run], key: str) -> float:
    values = [r[key] for r in runs if r[key] is not None and r[key] == r[key]]  # drop NaN
    return statistics.median(values) if values else float("nan")


def table(results: dict[tuple[str, str, int], list[Run]]) -> list[dict[str, Any]]:
    raw = {
        sync: median_of(runs, "writes_per_s")
        for (m, sync, _), runs in results.items()
        if m == "raw"
    }
    rows = []
    for (mode, sync, clients), runs in results.items():
        errors: Counter[str] = Counter()
        for r in runs:
            errors.update(r["errors"])
        mismatches = sum(r["rows"] != r["acked"] for r in runs)
        row: dict[str, Any] = {"mode": mode, "sync": sync, "clients": clients, "runs": len(runs)}
        row |= {"errors": dict(errors), "mismatches": mismatches}
        for key in ("writes_per_s", "p50_ms", "p99_ms", "max_ms", "fairness", "mean_batch_size"):
            row[key] = (
                median_of(runs, key) if mode == "mpwriter" or key != "mean_batch_size" else None
            )
        speeds = [r["writes_per_s"] for r in runs]
        row["range"] = f"{min(speeds):.0f}-{max(speeds):.0f}"
        row["vs_raw"] = (
            row["writes_per_s"] / raw[sync] if mode == "mpwriter" and raw.get(sync) else None
        )
        rows.append(row)
    return rows


def cell(value: Any, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)  # None, NaN


COLUMNS: list[
    tuple[str, int, Callable[[dict[str, Any]], str]]
] = [  # title, width, how to show a median row
    ("mode", -8, lambda r: r["mode"]),
    ("sync", -6, lambda r: r["sync"]),
    ("clients", 7, lambda r: str(r["clients"])),
    ("writes/s", 9, lambda r: cell(r["writes_per_s"], ".0f")),
    ("min-max", 11, lambda r: r["range"]),
    ("p50 ms", 7, lambda r: cell(r["p50_ms"], ".2f")),
    ("p99 ms", 7, lambda r: cell(r["p99_ms"], ".2f")),
    ("max ms", 7, lambda r: cell(r["max_ms"], ".1f")),
    ("fair", 5, lambda r: cell(r["fairness"], ".2f")),
    ("errors", 6, lambda r: str(sum(r["errors"].values()))),
    ("batch", 6, lambda r: cell(r["mean_batch_size"], ".2f")),
    ("vs raw", 6, lambda r: cell(r["vs_raw"], ".2f")),
]


def print_table(rows: list[dict[str, Any]]) -> None:
    line = " ".join(f"{title:{'<' if w < 0 else '>'}{abs(w)}}" for title, w, _ in COLUMNS)
    print(line)
    print("-" * len(line))
    for r in rows:
        cells = (f"{show(r):{'<' if w < 0 else '>'}{abs(w)}}" for _, w, show in COLUMNS)
        print(" ".join(cells) + ("  MISMATCH" if r["mismatches"] else ""))
    for r in rows:
        for message, n in r["errors"].items():
            print(f"errors {r['mode']} {r['sync']} x{r['clients']}: {n} x {message}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,2,4,8,16,32", help="comma-separated client counts")
    parser.add_argument("--sync", default="NORMAL,FULL", help="PRAGMA synchronous values")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the databases go")
    parser.add_argument("--json", metavar="PATH", help="write every run and the medians here")
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.sync = [s.strip().upper() for s in args.sync.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",")]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine(args.dir)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    configs = configurations(args.modes, args.sync, args.clients)
    results: dict[tuple[str, str, int], list[Run]] = {c: [] for c in configs}
    for round_no in range(1, args.runs + 1):
        print(f"round {round_no}/{args.runs}", flush=True)
        for mode, sync, clients in configs:
            run = run_once(mode, sync, clients, args.duration, args.dir)
            check(run)
            results[(mode, sync, clients)].append(run)
    rows = table(results)
    print(f"\nmedians of {args.runs} run(s) of {args.duration:g} s each:")
    print_table(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(
                {
                    "machine": info,
                    "args": vars(args),
                    "medians": rows,
                    "runs": [r for v in results.values() for r in v],
                },
                out,
                indent=1,
            )
    runs = [r for v in results.values() for r in v]
    return 1 if any(r["problems"] or r["rows"] != r["acked"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
