"""Bulk load: one executemany of many ~100-byte rows, through mpwriter and in-process.

  bulk-mpwriter   writer.executemany(INSERT, rows): one call (pickled in the
                  caller, sent as frames, unpickled and run by the writer, one
                  transaction)
  bulk-inprocess  the same executemany on a plain sqlite3 connection in the
                  client process itself, BEGIN ... COMMIT around it

Both run in a forked client process that builds the rows before the clock
starts; each run uses a fresh database with the same pragmas (WAL, the given
synchronous).

  stream          writer.executemany(INSERT, generator) of --stream-rows rows
                  that are made while they are read: how much the caller's peak
                  memory grows during the call (its VmHWM, reset just before,
                  less its VmRSS before), and the writer's peak RSS
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from multiprocessing.connection import Connection
from typing import Any

import _benchlib as lib
import mpwriter
from bench_insert import INSERT, SCHEMA, count_rows
from mpwriter._wire.frames import PICKLE_PROTOCOL

MODES = ("bulk-mpwriter", "bulk-inprocess")
STREAM_MODE = "stream"
BULK_TIMEOUT = 300.0


def bulk_rows(n: int) -> list[tuple[int, str]]:
    """Distinct ~100-byte payloads (pickle would send one shared string only once)."""
    return list(generated_rows(n))


def generated_rows(n: int) -> Iterator[tuple[int, str]]:
    """`bulk_rows`' rows, each made only when it is read."""
    return ((i % 100, f"row-{i:09d}:".ljust(100, "x")) for i in range(n))


def reset_peak_memory() -> bool:
    """Reset this process's VmHWM to its current VmRSS (Linux 4.0+); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def stream(writer: Any, rows: int, out: Connection) -> None:
    """In a forked client: one executemany of a generator; the peak memory it added."""
    figures: dict[str, Any] = {"peak_reset": reset_peak_memory()}
    before = lib.proc_memory_mb()
    try:
        t0 = time.perf_counter()
        writer.executemany(INSERT, generated_rows(rows), timeout=BULK_TIMEOUT)
        figures["seconds"] = time.perf_counter() - t0
    except Exception as exc:
        out.send(("error", f"executemany raised {lib.error_key(exc)}"))
        return
    after = lib.proc_memory_mb()
    figures["caller_rss_before_mb"] = before["vmrss"]
    # Without the reset, VmHWM may predate the call: then this overstates it.
    figures["caller_peak_added_mb"] = after["vmhwm"] - before["vmrss"]
    out.send(("done", figures))


def load(mode: str, path: str, sync: str, rows: int, writer: Any, out: Connection) -> None:
    """In a forked client: build the rows, then time one executemany of them."""
    params = bulk_rows(rows)
    figures: dict[str, float] = {}
    try:
        if mode == "bulk-mpwriter":
            # Not part of the timed call: how long the caller's pickling alone takes.
            t0 = time.perf_counter()
            pickle.dumps((0.0, 0.0, (INSERT, params)), PICKLE_PROTOCOL)
            figures["pickle_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            writer.executemany(INSERT, params, timeout=BULK_TIMEOUT)
        else:
            with closing(lib.open_connection(path, sync)) as conn:
                t0 = time.perf_counter()
                conn.execute("BEGIN")
                conn.executemany(INSERT, params)
                conn.execute("COMMIT")
        figures["seconds"] = time.perf_counter() - t0
    except Exception as exc:
        out.send(("error", f"executemany raised {lib.error_key(exc)}"))
        return
    out.send(("done", figures))


def run_once(mode: str, sync: str, rows: int, base_dir: str) -> lib.Run:
    """One load on a fresh database, by a forked client (so that this process,
    which forks the writers, never holds the rows)."""
    run: lib.Run = {"workload": "bulk", "mode": mode, "sync": sync, "rows": rows}
    run["seconds"] = float("nan")
    with tempfile.TemporaryDirectory(prefix="mpwbench-bulk-", dir=base_dir) as tmp:
        path = os.path.join(tmp, "bulk.db")
        with closing(lib.open_connection(path, sync)) as conn:
            conn.execute(SCHEMA)
        writer = None
        if mode == "bulk-mpwriter":
            writer = lib.start_writer(path, sync, slow_request=None)
        try:
            sampler = lib.writer_sampler(writer) if writer else None
            if sampler:
                sampler.start()
            receive, send = lib.CTX.Pipe(duplex=False)
            process = lib.CTX.Process(
                target=load, args=(mode, path, sync, rows, writer, send), daemon=True
            )
            process.start()
            send.close()
            got, problems = lib.collect([receive], "done", BULK_TIMEOUT + 30)
            problems += [p for p in [lib.reap(process)] if p]
            receive.close()
            if got:
                run |= got[0]
            if sampler and writer:
                sampler.stop()
                run |= sampler.figures() | writer_split(writer)
        finally:
            if writer is not None:
                writer.close(timeout=60.0)
        run["stored"] = count_rows(path)
    expected = rows if got else 0  # nothing, if the call failed
    if run["stored"] != expected:
        problems.append(f"{run['stored']} rows stored, {expected} expected")
    return run | {"problems": problems}


def run_stream(sync: str, rows: int, base_dir: str) -> lib.Run:
    """One streamed load (`stream`) on a fresh database, by a forked client."""
    run: lib.Run = {"workload": "stream", "mode": STREAM_MODE, "sync": sync, "rows": rows}
    run["seconds"] = float("nan")
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mpwbench-stream-", dir=base_dir) as tmp:
        path = os.path.join(tmp, "stream.db")
        with closing(lib.open_connection(path, sync)) as conn:
            conn.execute(SCHEMA)
        writer = lib.start_writer(path, sync, slow_request=None)
        try:
            sampler = lib.writer_sampler(writer)
            sampler.start()
            receive, send = lib.CTX.Pipe(duplex=False)
            process = lib.CTX.Process(target=stream, args=(writer, rows, send), daemon=True)
            process.start()
            send.close()
            got, problems = lib.collect([receive], "done", BULK_TIMEOUT + 30)
            problems += [p for p in [lib.reap(process)] if p]
            receive.close()
            sampler.stop()
            run |= sampler.figures()
            if got:
                run |= got[0]
        finally:
            writer.close(timeout=60.0)
        run["stored"] = count_rows(path)
    expected = rows if got else 0
    if run["stored"] != expected:
        problems.append(f"{run['stored']} rows stored, {expected} expected")
    return run | {"problems": problems}


def check_stream(run: lib.Run) -> bool:
    line = f"  stream {run['sync']} {run['rows']} rows: {run['seconds']:.3f} s"
    line += f" stored={run['stored']}"
    if not run["problems"]:
        line += f" caller peak +{run['caller_peak_added_mb']:.1f} MB"
        line += "" if run["peak_reset"] else " (VmHWM could not be reset: an upper bound)"
        line += f", writer peak RSS {lib.cell(run['writer_rss_peak_mb'], '.1f')} MB"
    print(line, flush=True)
    for problem in run["problems"]:
        print(f"  *** PROBLEM stream: {problem} ***", flush=True)
    return not run["problems"]


def stream_summary(runs: list[lib.Run]) -> dict[str, Any]:
    """Medians of the streamed loads."""
    out: dict[str, Any] = {"runs": len(runs), "rows": runs[0]["rows"] if runs else 0}
    for key in ("seconds", "caller_peak_added_mb", "writer_rss_peak_mb"):
        out[key] = lib.median_of(runs, key)
    out["caller_peak_added_mb_max"] = max(
        (r["caller_peak_added_mb"] for r in runs if "caller_peak_added_mb" in r), default=None
    )
    return out


def writer_split(writer: mpwriter.Writer) -> dict[str, float]:
    """The writer's own timing of the one request: queue wait (from the caller's
    send, pickling included, until unpickled in the writer) and execution
    (executemany and COMMIT)."""
    latency = writer.stats(timeout=lib.OP_TIMEOUT)["latency_ms"]
    return {
        "queue_wait_s": latency["queue_wait"]["max"] / 1000,
        "execution_s": latency["execution"]["max"] / 1000,
    }


def check(run: lib.Run) -> bool:
    line = f"  {run['mode']} {run['sync']} {run['rows']} rows: {run['seconds']:.3f} s"
    line += f" stored={run['stored']}"
    if run["mode"] == "bulk-mpwriter" and not run["problems"]:
        line += f" (writer: queue wait {run['queue_wait_s']:.3f} s"
        line += f" incl. pickling ~{run['pickle_s']:.3f} s, execution {run['execution_s']:.3f} s;"
        line += f" peak RSS {run['writer_rss_peak_mb']:.1f} MB)"
    print(line, flush=True)
    for problem in run["problems"]:
        print(f"  *** PROBLEM {run['mode']}: {problem} ***", flush=True)
    return not run["problems"]


def summary(runs: list[lib.Run]) -> dict[str, Any]:
    """Medians of both modes and the ratio in-process time / mpwriter time."""
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in MODES}
    out: dict[str, Any] = {"runs": len(by_mode["bulk-mpwriter"])}
    for mode, mode_runs in by_mode.items():
        out[f"{mode}_s"] = lib.median_of(mode_runs, "seconds")
        out[f"{mode}_all_s"] = [r["seconds"] for r in mode_runs]
    out["ratio"] = out["bulk-inprocess_s"] / out["bulk-mpwriter_s"]
    for key in ("writer_rss_peak_mb", "queue_wait_s", "pickle_s", "execution_s"):
        out[key] = lib.median_of(by_mode["bulk-mpwriter"], key)
    out["rows"] = runs[0]["rows"] if runs else 0
    return out
