"""Random SIGKILLs of writer clients: no acknowledged write may be lost.

Clients are forked processes sharing one `mpwriter.Writer`. Each inserts
``(client, seq)`` for seq = 0, 1, 2... one at a time and, after every
``execute()`` that returned, sends that seq down a pipe of its own (the
*acknowledgement*). The driver SIGKILLs a random live client at random moments
-- it waits on the acknowledgement pipes with a random deadline in
``[0, max_pause]``, then kills -- reaps it, and starts a replacement under a new
client id. Afterwards every surviving client must still make progress, and the
database must hold, for each client, exactly the rows ``seq = 0..m`` where ``m``
is its last acknowledged seq, or the one after it (a client killed between the
COMMIT and its acknowledgement). A client is killed anywhere: pickling, in the
middle of registering a reply pipe, writing its request frame, waiting for the
reply, or sending its acknowledgement.

tests/test_faults.py runs `run_client_kills` with 100 kills; this script runs
more and prints the figures (a stress tool: it never gates the build):

  PYTHONPATH=. python3 tests/kill_clients.py                  # 200 kills
  PYTHONPATH=. python3 tests/kill_clients.py --kills 1000 --clients 8 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import closing
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import mpwriter
from _faults import (
    INSERT,
    PG_SCHEMES,
    machine_line,
    print_verdict,
    reap,
    reset_postgres,
    schema_for,
)

STALL = 0.5  # seconds without any acknowledgement from any client counts as a stall
_DEADLINE = 10.0  # for every wait on a child: its pipe to EOF, its exit


def client_loop(
    writer: mpwriter.Writer, client: int, acks: Connection, control: Connection
) -> None:
    """Child process body: insert seq 0, 1, 2... and acknowledge each once committed.

    Acknowledgements are ints; a str is the error that ended the client. Any
    message on ``control`` (or its EOF) means "stop after this insert".
    """
    seq = 0
    try:
        while not control.poll():
            writer.execute(INSERT, (client, seq))
            # One small message is one write(2) below PIPE_BUF: a SIGKILL lands
            # before it or after it, never in the middle.
            acks.send(seq)
            seq += 1
    except BaseException as exc:
        acks.send(f"{type(exc).__name__}: {exc}")
        raise


@dataclass
class _Client:
    client: int
    process: Any
    acks: Connection
    control: Connection
    last_ack: int = -1


@dataclass
class KillReport:
    """What `run_client_kills` saw; `audit` checks the database against ``acked``."""

    seed: int
    kills: int = 0
    acked: dict[int, int] = field(default_factory=dict)  # client -> last acknowledged seq
    acknowledged_writes: int = 0
    elapsed: float = 0.0
    longest_gap: float = 0.0  # longest time with no acknowledgement from any client
    stalls: int = 0  # gaps longer than STALL
    errors: list[str] = field(default_factory=list)  # clients that failed on their own
    no_progress: list[int] = field(default_factory=list)  # survivors stuck at the end
    bad_exits: dict[int, int | None] = field(default_factory=dict)  # survivors' exit codes


def run_client_kills(
    writer: mpwriter.Writer,
    kills: int,
    *,
    clients: int = 4,
    seed: int | None = None,
    max_pause: float = 0.02,
    progress_timeout: float = 5.0,
) -> KillReport:
    """Run ``clients`` clients and SIGKILL one at random ``kills`` times; stop them all.

    ``writer`` must be an open handle on a database with the `items` table,
    owned by this process. Returns what was acknowledged and how it went; the
    caller checks the database with `audit`.
    """
    report = KillReport(seed=random.randrange(1 << 32) if seed is None else seed)
    rng = random.Random(report.seed)
    ctx = multiprocessing.get_context("fork")
    ids = itertools.count()
    live: dict[Connection, _Client] = {}
    last_ack_at = started = time.monotonic()

    def start_client() -> None:
        acks_r, acks_w = ctx.Pipe(duplex=False)
        control_r, control_w = ctx.Pipe(duplex=False)
        client = next(ids)
        process = ctx.Process(
            target=client_loop,
            args=(writer, client, acks_w, control_r),
            name=f"kill-clients {client}",
            daemon=True,
        )
        process.start()
        # Closed here so that the client holds the only write end: EOF on
        # ``acks_r`` then means "that client is gone, and so is everything it sent".
        acks_w.close()
        control_r.close()
        live[acks_r] = _Client(client, process, acks_r, control_w)

    def receive(entry: _Client) -> bool:
        """Take one message from ``entry``; False at EOF."""
        nonlocal last_ack_at
        try:
            message = entry.acks.recv()
        except EOFError:
            return False
        if not isinstance(message, int):
            report.errors.append(f"client {entry.client}: {message}")
            return True
        if message != entry.last_ack + 1:
            report.errors.append(f"client {entry.client}: ack {message} after {entry.last_ack}")
        entry.last_ack = message
        report.acknowledged_writes += 1
        now = time.monotonic()
        gap, last_ack_at = now - last_ack_at, now
        report.longest_gap = max(report.longest_gap, gap)
        if gap > STALL:
            report.stalls += 1
        return True

    def finish(entry: _Client) -> int | None:
        """Read ``entry``'s pipe to EOF, reap it, record what it acknowledged."""
        del live[entry.acks]
        deadline = time.monotonic() + _DEADLINE
        while wait([entry.acks], max(0.0, deadline - time.monotonic())):
            if not receive(entry):
                break
        else:
            report.errors.append(f"client {entry.client}: its pipe did not close in time")
        reap(entry.process)
        entry.acks.close()
        entry.control.close()
        report.acked[entry.client] = entry.last_ack
        code: int | None = entry.process.exitcode
        return code

    def pump(timeout: float) -> None:
        """Handle acknowledgements for ``timeout`` seconds (a wait, not a sleep)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            for conn in wait(list(live), max(0.0, remaining)):
                entry = live[conn]  # type: ignore[index]  # wait() returns what it was given
                while entry.acks.poll():
                    if not receive(entry):
                        # Died on its own (its error is already recorded): replace it.
                        finish(entry)
                        start_client()
                        break
            if remaining <= 0:
                return

    for _ in range(clients):
        start_client()
    try:
        for _ in range(kills):
            pump(rng.uniform(0.0, max_pause))
            victim = rng.choice(list(live.values()))
            # Process.kill(): no signal if the victim was reaped already (it
            # died on its own), so never to a recycled pid.
            victim.process.kill()
            finish(victim)
            report.kills += 1
            start_client()

        # Every survivor must still get writes through (a replacement for one
        # that failed meanwhile counts from no acknowledgement at all).
        marks = {entry.client: entry.last_ack for entry in live.values()}

        def stuck() -> list[int]:
            return [e.client for e in live.values() if e.last_ack == marks.get(e.client, -1)]

        deadline = time.monotonic() + progress_timeout
        while stuck() and time.monotonic() < deadline:
            pump(min(0.05, max(0.0, deadline - time.monotonic())))
        report.no_progress = stuck()
    finally:
        for entry in live.values():
            with contextlib.suppress(BrokenPipeError):  # it may have failed meanwhile
                entry.control.send(None)
        for entry in list(live.values()):
            code = finish(entry)
            if code != 0:
                report.bad_exits[entry.client] = code
        report.elapsed = time.monotonic() - started
    return report


@dataclass
class Audit:
    """The database checked against a `KillReport`."""

    rows: int
    integrity: str
    lost: list[tuple[int, int]]  # acknowledged (client, seq) missing from the table
    unexpected: list[str]  # rows that no client could have written


def audit(db_path: str | os.PathLike[str], acked: dict[int, int]) -> Audit:
    """Check that every acknowledged row is present and nothing else is."""
    postgres = os.fspath(db_path).startswith(PG_SCHEMES)
    with closing(mpwriter.reader(db_path)) as conn:
        # PostgreSQL has no integrity_check: its constraints held at each COMMIT.
        integrity = (
            "ok"
            if postgres
            else "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
        )
        found: dict[int, list[int]] = defaultdict(list)
        for client, seq in conn.execute("SELECT client, seq FROM items ORDER BY client, seq"):
            found[client].append(seq)
    rows = sum(len(seqs) for seqs in found.values())
    lost: list[tuple[int, int]] = []
    unexpected: list[str] = []
    for client, last in sorted(acked.items()):
        seqs = found.pop(client, [])
        lost += [(client, seq) for seq in sorted(set(range(last + 1)) - set(seqs))]
        # At most one write past the last acknowledgement: the one in flight.
        extra = [seq for seq in seqs if seq > last]
        if extra not in ([], [last + 1]) or len(seqs) != len(set(seqs)):
            unexpected.append(f"client {client}: seqs {seqs} with last ack {last}")
    unexpected += [f"unknown client {client}: seqs {seqs}" for client, seqs in found.items()]
    return Audit(rows, integrity, lost, unexpected)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-pause", type=float, default=0.02, help="seconds between kills, max")
    parser.add_argument("--dir", default=None, help="where the database goes (default: a temp dir)")
    parser.add_argument(
        "--database", default=None, help="a postgresql:// URL instead (its items table is replaced)"
    )
    args = parser.parse_args()

    print(machine_line())
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = args.database or os.path.join(directory, "kill_clients.db")
        if args.database:
            reset_postgres(args.database)
        with mpwriter.start(path, init=schema_for(path), context="fork") as writer:
            report = run_client_kills(
                writer, args.kills, clients=args.clients, seed=args.seed, max_pause=args.max_pause
            )
            stats = writer.stats()
        result = audit(path, report.acked)

    print(f"seed:                 {report.seed}")
    print(f"kills:                {report.kills}  ({args.clients} clients)")
    print(f"acknowledged writes:  {report.acknowledged_writes}")
    print(f"rows:                 {result.rows}")
    print(f"elapsed:              {report.elapsed:.2f} s")
    print(f"stalls (> {STALL} s):     {report.stalls}  (longest gap {report.longest_gap:.3f} s)")
    print(f"writer:               {stats['commits']} commits, {stats['requests']} requests,")
    print(f"                      errors {stats['errors_by_class'] or 'none'}")
    problems = {
        "lost acknowledged rows": result.lost,
        "unexpected rows": result.unexpected,
        "client errors": report.errors,
        "survivors without progress": report.no_progress,
        "survivors' bad exits": report.bad_exits,
        "writer errors": stats["errors_by_class"],
    }
    if result.integrity != "ok":
        problems["integrity_check"] = [result.integrity]
    return print_verdict({name: what for name, what in problems.items() if what})


if __name__ == "__main__":
    sys.exit(main())
