"""mpwriter benchmark: inserts, read-modify-write, bulk load, memory; and the targets.

Workloads (each run on a fresh WAL database; details in each module):

  bench_insert.py  closed-loop single-row inserts, modes raw, naive, thread,
                   mpwriter and echo (mpwriter's transport with no database)
  bench_rmw.py     "bank" transfers (read two balances, write both and a
                   ledger row, in one transaction), modes rmw-mpwriter,
                   rmw-naive-default, rmw-naive-immediate; invariants checked
  bench_bulk.py    one executemany of --bulk-rows rows: mpwriter vs in-process;
                   "stream": one executemany of a generator of --stream-rows
                   rows, the caller's peak memory growth
  bench_memory.py  a client's added memory after --memory-calls calls
  bench_floor.py   "floor": SELECT ? round trips through mpwriter against the
                   transport floor (plain pipes, pickle, no database), at 1
                   and 8 clients
  (the writer's resident memory is sampled during every mpwriter insert run)

Each configuration runs --runs times; within a round every mode runs in turn
(interleaved, so that a noisy neighbour hurts all modes alike), and the tables
show medians. The machine comes first, the project's targets last. Usage
(from the repository root):

  PYTHONPATH=. python3 tools/bench.py --quick                 # ~1 minute smoke run
  PYTHONPATH=. python3 tools/bench.py                         # everything, 3 runs of 3 s
  PYTHONPATH=. python3 tools/bench.py --duration 10 --runs 5 --json tools/results/b.json
  PYTHONPATH=. python3 tools/bench.py --modes raw,mpwriter,echo --clients 8 --sync NORMAL
  PYTHONPATH=. python3 tools/bench.py --plot tools/results/bench.png   # needs matplotlib
  PYTHONPATH=. python3 tools/bench.py --dir /mnt/ssd/tmp      # where the databases go
  PYTHONPATH=. python3 tools/bench.py --database postgresql://postgres@127.0.0.1/postgres
      # PostgreSQL: mpwriter vs a connection per process (tools/bench_pg.py; takes its options)

Exit status 1 if any run had a problem: a hung or dead client, a row count
that does not match the acknowledged writes, or a broken invariant in a mode
that must keep it (naive-default is expected to break them). Targets that are
not met do not change the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

import _benchlib as lib
import bench_bulk
import bench_floor
import bench_insert
import bench_memory
import bench_report
import bench_rmw

EXTRA_MODES = ("bulk", "stream", "memory", "floor")
MODES = bench_insert.MODES + bench_rmw.MODES + EXTRA_MODES
QUICK = {
    "clients": "1,8,16",
    "rmw_clients": "8,16",
    "duration": 1.0,
    "runs": 1,
    "stream_rows": 200_000,
}
LEGEND = """\
  worst ms: the worst latency of all the runs, as the clients timed it; w-worst: the
  writer's own worst (caller's send to reply written) over its last 10,000 requests.
  wRSS: the writer's peak VmRSS, which counts the pages it still shares with this
  process (it is forked from here); wUSS: its private pages, at the end of the run."""
Results = dict[tuple[str, str, int], list[lib.Run]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="modes: " + ", ".join(MODES),
    )
    add = parser.add_argument
    add("--clients", default="1,2,4,8,16,32", help="client counts of the insert modes")
    add("--rmw-clients", default="8,16", help="client counts of the rmw modes")
    add("--sync", default="NORMAL,FULL", help="PRAGMA synchronous values (bulk: the first)")
    add("--modes", default=",".join(MODES), help="comma-separated subset of the modes")
    add("--duration", type=float, default=3.0, help="seconds per timed run")
    add("--runs", type=int, default=3, help="runs per configuration (medians are shown)")
    add("--bulk-rows", type=int, default=200_000, help="rows of the bulk executemany")
    add("--stream-rows", type=int, default=2_000_000, help="rows of the streamed executemany")
    add("--memory-calls", type=int, default=bench_memory.CALLS, help="calls of the memory probe")
    add("--quick", action="store_true", help="smoke run: " + json.dumps(QUICK))
    add("--dir", default=tempfile.gettempdir(), help="where the databases go")
    add("--json", metavar="PATH", help="write every run, the medians and the targets here")
    add("--plot", metavar="PATH", help="PNG of throughput and p99 against clients (matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.clients = [int(c) for c in str(args.clients).split(",")]
    args.rmw_clients = [int(c) for c in str(args.rmw_clients).split(",")]
    args.sync = [s.strip().upper() for s in args.sync.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",")]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    return args


Rounds = tuple[Results, Results, list[lib.Run], list[lib.Run], list[lib.Run], list[lib.Run]]


def run_rounds(args: argparse.Namespace) -> Rounds:
    """Every round runs every configuration once; returns all runs, by workload."""
    insert_modes = [m for m in bench_insert.MODES if m in args.modes]
    rmw_modes = [m for m in bench_rmw.MODES if m in args.modes]
    insert_configs = bench_insert.configurations(insert_modes, args.sync, args.clients)
    rmw_configs = [
        c
        for sync in args.sync
        for c in bench_rmw.configurations(args.rmw_clients, sync)
        if c[0] in rmw_modes
    ]
    inserts: Results = {c: [] for c in insert_configs}
    rmw: Results = {c: [] for c in rmw_configs}
    bulk: list[lib.Run] = []
    memory: list[lib.Run] = []
    streams: list[lib.Run] = []
    floors: list[lib.Run] = []
    sound = True
    for round_no in range(1, args.runs + 1):
        print(f"round {round_no}/{args.runs}", flush=True)
        for mode, sync, clients in insert_configs:
            run = bench_insert.run_once(mode, sync, clients, args.duration, args.dir)
            sound &= bench_insert.check(run)
            inserts[(mode, sync, clients)].append(run)
        for mode, sync, clients in rmw_configs:
            run = bench_rmw.run_once(mode, sync, clients, args.duration, args.dir)
            sound &= bench_rmw.check(run)
            rmw[(mode, sync, clients)].append(run)
        if "bulk" in args.modes:
            # Alternate which goes first: the second may find a warmer page cache.
            order = bench_bulk.MODES if round_no % 2 else bench_bulk.MODES[::-1]
            for mode in order:
                run = bench_bulk.run_once(mode, args.sync[0], args.bulk_rows, args.dir)
                sound &= bench_bulk.check(run)
                bulk.append(run)
        if "stream" in args.modes:
            run = bench_bulk.run_stream(args.sync[0], args.stream_rows, args.dir)
            sound &= bench_bulk.check_stream(run)
            streams.append(run)
        if "memory" in args.modes:
            run = bench_memory.run_once(args.sync[0], args.dir, args.memory_calls)
            sound &= bench_memory.check(run)
            memory.append(run)
        if "floor" in args.modes:
            # Alternate which goes first, as for bulk.
            order = bench_floor.MODES if round_no % 2 else bench_floor.MODES[::-1]
            for clients in bench_floor.CLIENTS:
                for mode in order:
                    run = bench_floor.run_once(mode, clients, args.duration, args.sync[0], args.dir)
                    print(f"  {mode}-{clients:<18} {run['per_second']:9.0f} round trips/s")
                    floors.append(run)
    args.sound = sound
    return inserts, rmw, bulk, streams, memory, floors


def print_key_figures(figures: dict[str, Any]) -> None:
    def shown(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        if isinstance(value, dict):
            return ", ".join(f"{k} {shown(v)}" for k, v in value.items())
        return "-" if value is None else str(value)

    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"  {name:{width}}  {shown(value)}")


def strict_json(value: Any) -> Any:
    """NaN (a figure not measured) as null: the output stays standard JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--database" or a.startswith("--database=") for a in argv):
        # PostgreSQL has its own workload and table (tools/bench_pg.py).
        import bench_pg

        return bench_pg.main(argv)
    args = parse_args(argv)
    info = lib.machine(args.dir)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    inserts, rmw, bulk_runs, stream_runs, memory_runs, floor_runs = run_rounds(args)
    header = f"medians of {args.runs} run(s) of {args.duration:g} s each"

    insert_rows = bench_insert.table(inserts)
    if insert_rows:
        print(f"\ninserts, {header}.")
        print(LEGEND)
        lib.print_table(insert_rows, bench_insert.COLUMNS)
    rmw_rows = bench_rmw.table(rmw)
    if rmw_rows:
        print(f"\nread-modify-write (bank), {header}:")
        lib.print_table(rmw_rows, bench_rmw.COLUMNS)
    bulk = bench_bulk.summary(bulk_runs) if bulk_runs else None
    if bulk:
        print(
            f"\nbulk executemany of {bulk['rows']} rows, median of {bulk['runs']}:"
            f" mpwriter {bulk['bulk-mpwriter_s']:.3f} s,"
            f" in-process {bulk['bulk-inprocess_s']:.3f} s"
            f", in-process/mpwriter = {bulk['ratio']:.2f}"
        )
        print(
            f"  mpwriter's time: queue wait {lib.cell(bulk['queue_wait_s'], '.3f')} s (pickling"
            f" in the caller ~{lib.cell(bulk['pickle_s'], '.3f')} s, the pipe, unpickling in the"
            f" writer), execution {lib.cell(bulk['execution_s'], '.3f')} s; writer peak RSS"
            f" {lib.cell(bulk['writer_rss_peak_mb'], '.1f')} MB"
        )
    streamed = bench_bulk.stream_summary(stream_runs) if stream_runs else None
    if streamed:
        print(
            f"\nstreamed executemany of a {streamed['rows']}-row generator, median of"
            f" {streamed['runs']}: {lib.cell(streamed['seconds'], '.2f')} s, the caller's peak"
            f" memory +{lib.cell(streamed['caller_peak_added_mb'], '.1f')} MB, the writer's peak"
            f" RSS {lib.cell(streamed['writer_rss_peak_mb'], '.1f')} MB"
        )
    memory = bench_memory.summary(memory_runs) if memory_runs else None
    if memory:
        print(
            f"\nclient memory after {memory['calls']} calls, median:"
            f" +{memory['user_rss_added_mb']:.2f} MB RSS, +{memory['user_uss_added_mb']:.2f} MB USS"
            f" (a control client that makes no calls: +{memory['control_rss_added_mb']:.2f} MB RSS,"
            f" +{memory['control_uss_added_mb']:.2f} MB USS)"
        )

    floor = bench_floor.summary(floor_runs) if floor_runs else None
    if floor:
        bench_floor.print_summary(floor, header)

    insert_runs = [r for runs in inserts.values() for r in runs]
    figures = bench_report.key_figures(
        insert_rows, insert_runs, rmw_rows, bulk, streamed, memory, args.clients, floor
    )
    print("\nkey figures:")
    print_key_figures(figures)
    found = bench_report.targets(figures, args.duration)
    print("\ntargets:")
    bench_report.print_targets(found)

    if args.plot:
        why_not = bench_report.plot(insert_rows, args.sync, args.plot)
        print(f"\nplot: {args.plot}" if why_not is None else f"\nno plot: {why_not}")
    if args.json:
        everything = {
            "machine": info,
            "args": vars(args),
            "inserts": insert_rows,
            "rmw": rmw_rows,
            "bulk": bulk,
            "stream": streamed,
            "memory": memory,
            "floor": floor,
            "key_figures": figures,
            "targets": [t._asdict() for t in found],
            "runs": insert_runs
            + [r for runs in rmw.values() for r in runs]
            + bulk_runs
            + stream_runs
            + memory_runs
            + floor_runs,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(strict_json(everything), out, indent=1, allow_nan=False)
        print(f"json: {args.json}")
    return 0 if args.sound else 1


if __name__ == "__main__":
    sys.exit(main())
