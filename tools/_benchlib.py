"""Shared machinery of tools/bench.py: clients, the timed loop, summaries, memory.

Every client process runs `client_main`: build its operations, say "ready",
wait for the start signal, call its operation back to back until the shared
deadline (a `time.monotonic()` value, which is system-wide on Linux), then
report one compact `Summary` per client through a pipe. `run_clients` forks
the clients, releases them together and gathers their summaries; the
workloads (bench_insert.py, bench_rmw.py) only say what one operation is.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import multiprocessing
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection, wait
from typing import Any, TypedDict

import mpwriter

BUSY_TIMEOUT_MS = 5000
OP_TIMEOUT = 10.0  # mpwriter and thread-writer per-call timeout, seconds
START_TIMEOUT = 60.0  # a client that never gets the start signal gives up
READY_TIMEOUT = 30.0
RESULT_GRACE = OP_TIMEOUT + BUSY_TIMEOUT_MS / 1000 + 10.0  # past the deadline
JOIN_TIMEOUT = 5.0
MAX_SAMPLES = 20_000
CTX = multiprocessing.get_context("fork")

Op = Callable[[], Any]
# Builds one process's operations (one per client id) and a cleanup, in the
# client process: (path, sync, client ids, writer or None) -> (ops, cleanup).
OpsFactory = Callable[[str, str, list[int], Any], tuple[list[Op], Callable[[], None]]]
Run = dict[str, Any]


class Summary(TypedDict):
    client: int
    count: int  # operations that returned (acknowledged)
    applied: int  # of those, the ones that did not return False (a declined transfer)
    errors: dict[str, int]  # "ExceptionClass: message" -> occurrences
    samples: list[float]  # sorted latencies (ms) of successful operations, at most MAX_SAMPLES
    max_ms: float
    last_end: float  # time.monotonic() when the last operation returned


def error_key(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:100]


def open_connection(path: str, sync: str, busy_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit), WAL, ``sync``, busy_timeout."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    return conn


def start_writer(path: str, sync: str, **options: Any) -> mpwriter.Writer:
    """A fork-started writer (clients are forked from this process too)."""
    options.setdefault("timeout", OP_TIMEOUT)
    # The writer is forked from here: drop the garbage of earlier runs first, so
    # that it does not inherit it (its resident memory is measured).
    gc.collect()
    return mpwriter.start(path, synchronous=sync, context="fork", **options)


# -- client side --------------------------------------------------------------------


def drive(client: int, op: Op, deadline: float) -> Summary:
    """Call ``op`` back to back until ``deadline``; time each call."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    declined = 0
    last_end = time.monotonic()
    while last_end < deadline:
        t0 = time.perf_counter()
        try:
            outcome = op()
        except Exception as exc:
            errors[error_key(exc)] += 1
        else:
            latencies.append(time.perf_counter() - t0)
            declined += outcome is False
        last_end = time.monotonic()
    count = len(latencies)
    max_ms = max(latencies, default=0.0) * 1000
    if count > MAX_SAMPLES:
        latencies = random.sample(latencies, MAX_SAMPLES)
    samples = sorted(x * 1000 for x in latencies)
    return Summary(
        client=client,
        count=count,
        applied=count - declined,
        errors=dict(errors),
        samples=samples,
        max_ms=max_ms,
        last_end=last_end,
    )


def client_main(
    factory: OpsFactory,
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
        ops, cleanup = factory(path, sync, clients, writer)
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


# -- driver side ----------------------------------------------------------------------


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
    factory: OpsFactory,
    path: str,
    sync: str,
    groups: list[list[int]],
    duration: float,
    writer: Any = None,
    sampler: MemorySampler | None = None,
) -> tuple[list[Summary], float, list[str]]:
    """Fork one process per group of client ids, release them together, gather summaries.

    ``sampler`` (if any) runs from the start signal until the last summary.
    """
    start = CTX.Event()
    deadline = CTX.RawValue("d", 0.0)
    processes, pipes = [], []
    for ids in groups:
        receive, send = CTX.Pipe(duplex=False)
        process = CTX.Process(
            target=client_main,
            daemon=True,
            args=(factory, path, sync, ids, send, start, deadline, writer),
        )
        process.start()
        send.close()
        processes.append(process)
        pipes.append(receive)
    summaries: list[Summary] = []
    began = time.monotonic()
    try:
        _, problems = collect(pipes, "ready", READY_TIMEOUT)
        began = time.monotonic()
        if not problems:
            deadline.value = began + duration
            if sampler is not None:
                sampler.start()
            start.set()
            done, problems = collect(pipes, "done", duration + RESULT_GRACE)
            summaries = [s for group in done for s in group]
    finally:
        if sampler is not None:
            sampler.stop()
        problems += [p for p in map(reap, processes) if p]
        for pipe in pipes:
            pipe.close()
    return summaries, began, problems


# -- figures --------------------------------------------------------------------------


def weighted_percentiles(groups: list[tuple[list[float], float]], qs: list[float]) -> list[float]:
    """Percentiles ``qs`` (0..1, ascending) over sorted sample lists, each with a
    weight per sample (count / len(samples), since large clients are down-sampled).

    Streams a merge of the lists: the driver stays small, and the writer it
    forks next does not inherit a transient pile of tuples.
    """
    total = sum(len(samples) * weight for samples, weight in groups)
    if not total:
        return [float("nan")] * len(qs)
    merged = heapq.merge(*(zip(samples, itertools.repeat(w)) for samples, w in groups))
    out: list[float] = []
    acc, x = 0.0, float("nan")
    for x, weight in merged:
        acc += weight
        while len(out) < len(qs) and acc >= qs[len(out)] * total:
            out.append(x)
        if len(out) == len(qs):
            return out
    return out + [x] * (len(qs) - len(out))


def summarize(summaries: list[Summary], clients: int, began: float, problems: list[str]) -> Run:
    """The figures every workload shares, from one run's client summaries."""
    counts = [s["count"] for s in summaries]
    if len(summaries) != clients:
        problems = [*problems, f"only {len(summaries)}/{clients} clients reported"]
    acked = sum(counts)
    elapsed = max((s["last_end"] for s in summaries), default=began) - began
    groups = [(s["samples"], s["count"] / len(s["samples"])) for s in summaries if s["samples"]]
    p50, p99 = weighted_percentiles(groups, [0.50, 0.99])
    errors: Counter[str] = Counter()
    for s in summaries:
        errors.update(s["errors"])
    most = max(counts, default=0)
    return {
        "clients": clients,
        "acked": acked,
        "applied": sum(s["applied"] for s in summaries),
        "elapsed_s": elapsed,
        "ops_per_s": acked / elapsed if elapsed > 0 else 0.0,
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": max((s["max_ms"] for s in summaries), default=float("nan")),
        "fairness": min(counts) / most if most else 0.0,
        "per_client": counts,
        "errors": dict(errors),
        "problems": problems,
    }


def median_of(runs: Iterable[Run], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None and r[key] == r[key]]  # drop NaN
    return statistics.median(values) if values else float("nan")


def merged_errors(runs: Iterable[Run]) -> dict[str, int]:
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r["errors"])
    return dict(errors)


def cell(value: Any, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)  # None, NaN


def run_name(run: dict[str, Any]) -> str:
    """A run or a table row as the progress lines name it: "mode sync xclients"."""
    return f"{run['mode']} {run['sync']} x{run['clients']}"


def median_rates(
    results: dict[tuple[str, str, int], list[Run]], mode: str
) -> dict[tuple[str, int], float]:
    """The median ops/s of ``mode``, by (sync, clients): the baseline others are compared with."""
    return {
        (sync, clients): median_of(runs, "ops_per_s")
        for (m, sync, clients), runs in results.items()
        if m == mode
    }


def table_row(config: tuple[str, str, int], runs: list[Run], mismatches: int) -> dict[str, Any]:
    """The first figures of every workload's table row: one configuration over its runs.

    ``config`` is (mode, sync, clients); ``mismatches`` counts the runs whose
    rows disagree with their acknowledgements, as the workload defines it.
    The workload adds its own figures after these, then `spread_of`'s.
    """
    mode, sync, clients = config
    return {
        "mode": mode,
        "sync": sync,
        "clients": clients,
        "runs": len(runs),
        "errors": merged_errors(runs),
        "mismatches": mismatches,
        "problems": sum(len(r["problems"]) for r in runs),
    }


def spread_of(runs: list[Run]) -> dict[str, Any]:
    """How the runs of one configuration differ: the lowest fairness, the ops/s range."""
    speeds = [r["ops_per_s"] for r in runs]
    return {
        "min_fairness": min(r["fairness"] for r in runs),
        "range": f"{min(speeds):.0f}-{max(speeds):.0f}",
    }


Column = tuple[str, int, Callable[[dict[str, Any]], str]]  # title, width (<0: left), show


def lead_columns(mode_width: int, rate: str, rate_width: int) -> list[Column]:
    """The columns every workload's table starts with, from "mode" to "batch".

    ``mode_width`` fits the workload's longest mode (negative: left-aligned);
    ``rate`` titles the ops/s column, which is ``rate_width`` wide.
    """
    return [
        ("mode", mode_width, lambda r: r["mode"]),
        ("sync", -6, lambda r: r["sync"]),
        ("clients", 7, lambda r: str(r["clients"])),
        (rate, rate_width, lambda r: cell(r["ops_per_s"], ".0f")),
        ("min-max", 11, lambda r: r["range"]),
        ("p50 ms", 7, lambda r: cell(r["p50_ms"], ".2f")),
        ("p99 ms", 7, lambda r: cell(r["p99_ms"], ".2f")),
        ("worst ms", 8, lambda r: cell(r["max_ms"], ".1f")),
        ("w-worst", 7, lambda r: cell(r["writer_max_ms"], ".1f")),
        ("fair", 5, lambda r: cell(r["fairness"], ".2f")),
        ("errors", 6, lambda r: str(sum(r["errors"].values()))),
        ("batch", 6, lambda r: cell(r["mean_batch_size"], ".2f")),
    ]


def print_table(rows: list[dict[str, Any]], columns: list[Column]) -> None:
    widths = [width for _, width, _ in columns]

    def line(cells: Iterable[str]) -> str:
        pairs = zip(cells, widths, strict=True)
        return " ".join(f"{c:{'<' if w < 0 else '>'}{abs(w)}}" for c, w in pairs)

    header = line(title for title, _, _ in columns)
    print(header.rstrip())
    print("-" * len(header))
    for r in rows:
        flag = "  MISMATCH" if r["mismatches"] else ""
        print((line(show(r) for _, _, show in columns) + flag).rstrip())
    for r in rows:
        for message, n in r["errors"].items():
            print(f"errors {run_name(r)}: {n} x {message}")


# -- memory ---------------------------------------------------------------------------


def proc_memory_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM (/proc/PID/status) and the private part of the resident
    set, "uss" (Private_Clean + Private_Dirty, /proc/PID/smaps_rollup), in MB.

    A forked process starts with its parent's resident pages counted in its
    VmRSS; "uss" counts only the pages it does not share.
    """
    figures: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key.lower()] = int(value.split()[0]) / 1024
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            private = sum(int(line.split()[1]) for line in rollup if line.startswith("Private_"))
        figures["uss"] = private / 1024
    except OSError:
        pass  # kernels before 4.14
    return figures


class MemorySampler:
    """Samples a process's VmRSS from a thread; the peak, VmHWM and USS at the end."""

    INTERVAL = 0.05

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0.0
        self.samples = 0
        self.final: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> dict[str, float]:
        figures = proc_memory_mb(self.pid)
        self.peak_rss = max(self.peak_rss, figures["vmrss"])
        self.samples += 1
        return figures

    def _run(self) -> None:
        while True:
            try:
                self._sample()
            except OSError:
                return  # the process is gone
            if self._stop.wait(self.INTERVAL):
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT)
        with contextlib.suppress(OSError):  # the process is gone
            self.final = self._sample()

    def figures(self) -> dict[str, float | None]:
        return {
            "writer_rss_peak_mb": self.peak_rss or None,
            "writer_hwm_mb": self.final.get("vmhwm"),
            "writer_uss_mb": self.final.get("uss"),
        }


def final_stats(writer: mpwriter.Writer, problems: list[str]) -> dict[str, Any] | None:
    """The writer's stats() at the end of a run; None if it raised, noted in ``problems``."""
    try:
        return writer.stats(timeout=OP_TIMEOUT)
    except Exception as exc:
        problems.append(f"stats() raised {error_key(exc)}")
        return None


def writer_max_ms(stats: dict[str, Any] | None) -> float | None:
    """The writer's own worst end-to-end time (caller's send to reply written) over
    its recent requests (a window of the last 10,000): set against a client's
    worst, it tells a stall of the writer from a client that was not scheduled."""
    if not stats:
        return None
    return float(stats["latency_ms"]["total"]["max"])


def writer_sampler(writer: mpwriter.Writer) -> MemorySampler:
    return MemorySampler(int(writer.stats(timeout=OP_TIMEOUT)["pid"]))


# -- the machine ------------------------------------------------------------------------


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
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "mpwriter": f"{mpwriter.__version__} ({source_revision()})",
        "db_dir": base_dir,
        "db_fs": filesystem_of(base_dir),
        "loadavg_at_start": load,
    }
