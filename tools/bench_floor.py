"""The request path against the transport floor: round trips with no database work.

Two modes, run side by side (bench.py interleaves them, medians shown):

  floor   the transport floor: N clients and one server process, nothing but
          what a round trip needs -- each client pickles a small
          (sql, params) request, writes it with a 6-byte header on one shared
          pipe and does a blocking read of its own reply pipe; the server
          reads the shared pipe in big chunks, unpickles each request and
          writes a pickled 3-tuple back. No deadlines, no checksums, no
          slots, no database. (The logic of the shared probe
          ../shared/probes/transport_floor.py, so that the ratio is measured
          in the same run wherever the bench runs.)
  select  N forked clients, each calling ``writer.execute("SELECT ?", (n,))``
          in a closed loop on one mpwriter writer (SQLite, the bench's
          synchronous setting): mpwriter's whole request path, with the
          smallest statement there is

Each reports round trips/s over the wall-clock of the run and its CPU per
round trip (every process of the run, server or writer included: getrusage
of the children, reaped; mpwriter's includes its writer's start and close).
Usage (from the repository root):

  PYTHONPATH=. python3 tools/bench.py --modes floor --clients 1,8
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import resource
import statistics
import struct
import tempfile
import time
from typing import Any

import _benchlib as lib
import mpwriter

MODES = ("floor", "select")
CLIENTS = (1, 8)  # the counts the targets name
HEADER = struct.Struct("!IH")  # payload length, client number
CTX = multiprocessing.get_context("fork")


def _floor_server(request_fd: int, reply_fds: list[int], close_fds: list[int]) -> None:
    for fd in close_fds:  # the write ends inherited here: EOF comes once the clients are done
        os.close(fd)
    buffer = b""
    while True:
        data = os.read(request_fd, 1 << 16)
        if not data:
            return
        buffer += data
        while len(buffer) >= HEADER.size:
            length, client = HEADER.unpack_from(buffer)
            end = HEADER.size + length
            if len(buffer) < end:
                break
            request = pickle.loads(buffer[HEADER.size : end])
            buffer = buffer[end:]
            os.write(reply_fds[client], pickle.dumps((request[0], 1, None)))


def _floor_client(request_fd: int, reply_fd: int, number: int, stop_at: float, counts: Any) -> None:
    n = 0
    while time.monotonic() < stop_at:
        payload = pickle.dumps((n, "SELECT ?", (number,)))
        os.write(request_fd, HEADER.pack(len(payload), number) + payload)
        os.read(reply_fd, 4096)
        n += 1
    counts[number] = n


def _select_client(writer: mpwriter.Writer, number: int, stop_at: float, counts: Any) -> None:
    n = 0
    while time.monotonic() < stop_at:
        writer.execute("SELECT ?", (number,))
        n += 1
    counts[number] = n


def _run_clients(target: Any, args: list[tuple[Any, ...]], seconds: float, counts: Any) -> float:
    """Start one client per ``args``, all stopping ``seconds`` from now; the wall time."""
    stop_at = time.monotonic() + seconds
    started = time.monotonic()
    processes = [CTX.Process(target=target, args=(*a, stop_at, counts)) for a in args]
    for process in processes:
        process.start()
    for process in processes:
        process.join(seconds + 60)
        if process.exitcode is None:
            process.kill()
            process.join(5)
            raise RuntimeError("a client did not finish within a minute of its run")
    return time.monotonic() - started


def run_floor(clients: int, seconds: float) -> dict[str, Any]:
    request_r, request_w = os.pipe()
    replies = [os.pipe() for _ in range(clients)]
    counts = CTX.Array("q", clients)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    inherited = [request_w] + [r for r, _ in replies]
    server = CTX.Process(target=_floor_server, args=(request_r, [w for _, w in replies], inherited))
    server.start()
    try:
        args = [(request_w, replies[i][0], i) for i in range(clients)]
        wall = _run_clients(_floor_client, args, seconds, counts)
    finally:
        os.close(request_w)
        server.join(30)
        os.close(request_r)
        for r, w in replies:
            os.close(r)
            os.close(w)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = sum(counts)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"mode": "floor", "clients": clients, "per_second": total / wall,
            "cpu_us": cpu / max(total, 1) * 1e6}  # fmt: skip


def run_select(clients: int, seconds: float, sync: str, base_dir: str) -> dict[str, Any]:
    counts = CTX.Array("q", clients)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix="mpwbench-", dir=base_dir) as tmp:
        writer = lib.start_writer(os.path.join(tmp, "select.db"), sync)
        try:
            args = [(writer, i) for i in range(clients)]
            wall = _run_clients(_select_client, args, seconds, counts)
        finally:
            writer.close(timeout=30.0)
    # The writer and its supervisor are reaped by now: their CPU is counted,
    # their start and close included.
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = sum(counts)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"mode": "select", "clients": clients, "per_second": total / wall,
            "cpu_us": cpu / max(total, 1) * 1e6}  # fmt: skip


def run_once(mode: str, clients: int, seconds: float, sync: str, base_dir: str) -> dict[str, Any]:
    if mode == "floor":
        return run_floor(clients, seconds)
    return run_select(clients, seconds, sync, base_dir)


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per client count: the medians of both modes and their ratio (select / floor)."""
    rows = []
    for clients in sorted({r["clients"] for r in runs}):
        row: dict[str, Any] = {"clients": clients}
        for mode in MODES:
            rates = [r["per_second"] for r in runs if r["mode"] == mode and r["clients"] == clients]
            row[mode] = statistics.median(rates) if rates else None
        for mode in MODES:
            cpu = [r["cpu_us"] for r in runs if r["mode"] == mode and r["clients"] == clients]
            row[f"{mode}_cpu_us"] = statistics.median(cpu) if cpu else None
        row["ratio"] = row["select"] / row["floor"] if row["select"] and row["floor"] else None
        rows.append(row)
    return rows


def print_summary(rows: list[dict[str, Any]], header: str) -> None:
    print(f"\nthe request path against the transport floor (round trips/s), {header}:")
    print("  clients     floor  (CPU/rt)  mpwriter SELECT ?  (CPU/rt)  select/floor")
    for row in rows:
        print(
            f"  {row['clients']:7d} {lib.cell(row['floor'], '9.0f')}"
            f"  ({lib.cell(row['floor_cpu_us'], '4.1f')} us) {lib.cell(row['select'], '18.0f')}"
            f"  ({lib.cell(row['select_cpu_us'], '4.1f')} us)  {lib.cell(row['ratio'], '12.2f')}"
        )
