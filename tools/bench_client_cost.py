"""What a caller pays per request: `Writer.execute()` against the bare transport.

N forked clients run closed loops for --duration seconds against one writer
(the echo writer by default: no database, so the clients' share shows):

  execute  writer.execute(INSERT, params): pickling, framing, the reply pipe,
           decoding -- everything mpwriter does in the caller
  bare     the same request frame written again and again, then poll and
           read of the reply: the system calls alone, no Python per request

Each client reports its own user and system CPU (getrusage), and the writer's
CPU and context switches are read from /proc before and after (Linux), so the
table shows what a request costs on each side, how much of the caller's share
is mpwriter's Python, and how often the writer waited or was preempted. On a
machine where the clients share the cores with the writer, that CPU is
throughput. Modes alternate within each round; medians are shown. Usage
(from the repository root):

  PYTHONPATH=. python3 tools/bench_client_cost.py --clients 8 --runs 5
  PYTHONPATH=. python3 tools/bench_client_cost.py --database   # a real SQLite writer
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import pickle
import resource
import select
import statistics
import tempfile
import time
from multiprocessing.connection import Connection, wait
from typing import Any

import _benchlib as lib
import bench_insert
import mpwriter
from mpwriter import testing
from mpwriter._wire import frames as _wire

MODES = ("execute", "bare")
INSERT = bench_insert.INSERT
PAYLOAD = "x" * 100


def client(writer: mpwriter.Writer, mode: str, seconds: float, out: Connection) -> None:
    """In a forked client: loop for ``seconds``; send (requests, user s, system s)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    stop_at = time.monotonic() + seconds
    done = 0
    if mode == "execute":
        while time.monotonic() < stop_at:
            writer.execute(INSERT, (0, PAYLOAD))
            done += 1
    else:
        writer.stats()  # pools a reply pipe
        slot = writer._link.pool.local.free.pop()
        now = time.monotonic()
        # One request, sent again and again; its deadline is far enough that
        # the writer never drops it as expired.
        payload = pickle.dumps((now + 3600, now, (INSERT, (0, PAYLOAD))), _wire.PICKLE_PROTOCOL)
        key = testing.frame_key(writer)
        frame = _wire.encode_frame(
            _wire.Kind.EXECUTE,
            _wire.WHOLE,
            writer._link.pool.local.sender,
            1,
            slot.number,
            payload,
            key,
        )
        request_fd, reply_fd = writer._link.request_fd, slot.fd
        poller = select.poll()
        poller.register(reply_fd, select.POLLIN)
        poll = poller.poll
        while time.monotonic() < stop_at:
            os.write(request_fd, frame)
            if not poll(10_000):
                raise TimeoutError("no reply within 10 s")
            os.read(reply_fd, 1 << 16)
            done += 1
    after = resource.getrusage(resource.RUSAGE_SELF)
    out.send((done, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime))


def run_once(
    mode: str, clients: int, seconds: float, database: bool, base_dir: str
) -> dict[str, Any]:
    """One run on a fresh database; returns writes/s and CPU per request in µs."""
    with tempfile.TemporaryDirectory(dir=base_dir) as directory:
        path = os.path.join(directory, "cost.db")
        stub = contextlib.nullcontext() if database else bench_insert.echo_runner()
        with stub, lib.start_writer(path, "NORMAL", init=bench_insert.SCHEMA) as writer:
            fork = multiprocessing.get_context("fork")
            pipes, processes = [], []
            for _ in range(clients):
                receive, send = fork.Pipe(duplex=False)
                process = fork.Process(target=client, args=(writer, mode, seconds, send))
                process.start()
                send.close()
                pipes.append(receive)
                processes.append(process)
            writer_pid = writer.stats()["pid"]
            writer_before = process_cpu(writer_pid)
            switches_before = context_switches(writer_pid)
            results = []
            for receive in pipes:
                if not wait([receive], seconds + 30):
                    raise TimeoutError("a client did not report")
                results.append(receive.recv())
            writer_after = process_cpu(writer_pid)
            switches_after = context_switches(writer_pid)
            for process in processes:
                lib.reap(process)
    done = sum(r[0] for r in results)
    return {
        "rate": done / seconds,
        "writer_user_us": 1e6 * (writer_after[0] - writer_before[0]) / done,
        "writer_system_us": 1e6 * (writer_after[1] - writer_before[1]) / done,
        "writer_waits": (switches_after[0] - switches_before[0]) / done,
        "writer_preempted": (switches_after[1] - switches_before[1]) / done,
        "user_us": 1e6 * sum(r[1] for r in results) / done,
        "system_us": 1e6 * sum(r[2] for r in results) / done,
    }


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far (/proc/PID/stat; Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may hold spaces: the fields after it start past ")".
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of ``pid`` so far (/proc/PID/status).

    Voluntary: it waited (for a request, a disk); involuntary: it was
    preempted, on this machine mostly by the clients its replies woke.
    """
    counts = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name.endswith("ctxt_switches"):
                counts[name] = int(value)
    return counts["voluntary_ctxt_switches"], counts["nonvoluntary_ctxt_switches"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per mode (medians shown)")
    parser.add_argument("--database", action="store_true", help="a real writer, not echo")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where databases go")
    args = parser.parse_args()
    print("machine:", ", ".join(f"{k}={v}" for k, v in lib.machine(args.dir).items()))
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for round_number in range(args.runs):
        for mode in MODES:
            run = run_once(mode, args.clients, args.duration, args.database, args.dir)
            runs[mode].append(run)
            print(
                f"  round {round_number + 1} {mode:8} {run['rate']:8.0f} req/s"
                f"  client user {run['user_us']:5.1f} us  system {run['system_us']:5.1f} us"
                f"  writer user {run['writer_user_us']:5.1f} us"
                f"  system {run['writer_system_us']:5.1f} us"
            )
    writer_kind = "SQLite" if args.database else "echo"
    print(f"\n{args.clients} clients, {writer_kind} writer, medians of {args.runs} runs:")
    for mode in MODES:
        median = {key: statistics.median(r[key] for r in runs[mode]) for key in runs[mode][0]}
        print(
            f"  {mode:8} {median['rate']:8.0f} req/s  CPU per request: client"
            f" user {median['user_us']:5.1f} us, system {median['system_us']:5.1f} us;"
            f" writer user {median['writer_user_us']:5.1f} us,"
            f" system {median['writer_system_us']:5.1f} us; the writer waited"
            f" {median['writer_waits']:.2f} and was preempted"
            f" {median['writer_preempted']:.2f} times per request"
        )


if __name__ == "__main__":
    main()
