"""SIGKILLs of a whole process tree -- owner, writer, clients -- at one instant.

A child process owns the writer and its clients, in a process group of their
own; the clients report straight to this process. After a random number of
acknowledgements the whole group is SIGKILLed, and the database is opened with
plain sqlite3, as an application restarted after a crash would. The next
round starts a new tree on the same file, so rows acknowledged in every
earlier round are checked again. The clients and the audit are those of
tests/kill_writer.py, in tests/_faults.py.

  PYTHONPATH=. python3 tests/kill_tree.py                 # 5 tree kills
  PYTHONPATH=. python3 tests/kill_tree.py --rounds 20 --synchronous FULL
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import _faults as faults
import mpwriter


class TreeMembers(NamedTuple):
    """What a tree's owner reports once its writer and clients run."""

    owner: int
    writer: int
    clients: tuple[int, ...]


@dataclass
class TreeRound:
    """One tree killed: when, and what the database held afterwards."""

    after_acks: int  # acknowledgements this round before the kill
    acknowledged: int  # ... including those that reached this process after it
    elapsed: float
    audit: faults.Audit


@dataclass
class TreeKillReport:
    """What `run_tree` saw, round by round."""

    seed: int
    clients: int
    rounds: list[TreeRound] = field(default_factory=list)
    errors_by_class: dict[str, int] = field(default_factory=dict)
    unexpected_errors: list[str] = field(default_factory=list)
    max_call: float = 0.0
    overruns: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def problems(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "run failures": self.failures,
            "errors": self.unexpected_errors
            + [f"{n} x {e}" for e, n in self.errors_by_class.items()],
            "calls past their timeout": self.overruns,
        }
        for number, one in enumerate(self.rounds):
            found[f"round {number}: lost acknowledged rows"] = one.audit.lost
            found[f"round {number}: rows present although 'not sent'"] = one.audit.contradicted
            found[f"round {number}: unexplained rows"] = one.audit.unexplained
            if one.audit.integrity != "ok":
                found[f"round {number}: integrity_check"] = [one.audit.integrity]
        return {name: what for name, what in found.items() if what}


def run_tree(
    db_path: str | os.PathLike[str],
    rounds: int,
    clients: int = 4,
    *,
    seed: int | None = None,
    max_acks: int = 200,
    max_pause: float = 0.03,
    call_timeout: float = 5.0,
    synchronous: str = "NORMAL",
) -> TreeKillReport:
    """Start and SIGKILL a whole tree (owner, writer, clients) ``rounds`` times on ``db_path``.

    Each round kills the tree after a random number of acknowledgements in
    ``[1, max_acks]`` and a random wait in ``[0, max_pause]``, then audits
    the database, with every acknowledgement of every round so far.
    """
    report = TreeKillReport(
        seed=random.randrange(1 << 32) if seed is None else seed, clients=clients
    )
    rng = random.Random(report.seed)
    fleet = faults.Fleet(call_timeout)
    started = time.monotonic()
    for number in range(rounds):
        began = time.monotonic()
        acked_before = fleet.acknowledged
        acked_at_kill = _one_tree(
            db_path,
            number * clients,
            clients,
            fleet,
            report,
            rng,
            max_acks,
            max_pause,
            call_timeout,
            synchronous,
        )
        if acked_at_kill is None:
            break
        report.rounds.append(
            TreeRound(
                after_acks=acked_at_kill - acked_before,
                acknowledged=fleet.acknowledged - acked_before,
                elapsed=time.monotonic() - began,
                audit=faults.audit(db_path, fleet.logs, in_flight=True),
            )
        )
    report.elapsed = time.monotonic() - started
    report.errors_by_class = dict(fleet.errors)
    report.unexpected_errors = fleet.unexpected_errors
    report.max_call = fleet.max_call
    report.overruns = fleet.overruns
    return report


def _one_tree(
    db_path: str | os.PathLike[str],
    first_client: int,
    clients: int,
    fleet: faults.Fleet,
    report: TreeKillReport,
    rng: random.Random,
    max_acks: int,
    max_pause: float,
    call_timeout: float,
    synchronous: str,
) -> int | None:
    """Start a tree, kill it at a random moment; return ``fleet.acknowledged`` at the kill.

    None if the round went wrong (recorded in ``report.failures``).
    """
    ctx = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe(duplex=False) for _ in range(clients)]
    members_r, members_w = ctx.Pipe(duplex=False)
    control_r, control_w = ctx.Pipe(duplex=False)
    owner = ctx.Process(
        target=_tree_owner,
        args=(
            os.fspath(db_path),
            first_client,
            [w for _, w in pipes],
            call_timeout,
            synchronous,
            members_w,
            control_r,
        ),
        name="kill-writer tree owner",
        daemon=False,  # it has children of its own
    )
    owner.start()
    for number, (outcomes_r, outcomes_w) in enumerate(pipes):
        outcomes_w.close()  # the tree holds the only write ends: EOF once it is all gone
        fleet.add(first_client + number, outcomes_r)
    members_w.close()
    control_r.close()
    round_clients = set(range(first_client, first_client + clients))
    pidfds: list[int] = []
    try:
        if not members_r.poll(faults.DEADLINE + call_timeout):
            report.failures.append("the tree's owner did not report its members in time")
            return None
        try:
            members: TreeMembers = members_r.recv()
        except EOFError:
            report.failures.append(f"the tree's owner exited (code {owner.exitcode})")
            return None
        # pidfds first: they find each member dead, even once reaped elsewhere.
        pidfds = [os.pidfd_open(pid) for pid in (members.writer, *members.clients)]
        target = fleet.acknowledged + rng.randint(1, max_acks)
        if not fleet.pump(faults.DEADLINE, until=lambda: fleet.acknowledged >= target):
            report.failures.append("the tree's clients did not get their writes through")
            return None
        fleet.pump(rng.uniform(0.0, max_pause))
        after_acks = fleet.acknowledged
        # The owner is this process's child and not reaped yet: its pid, which
        # names the group, cannot have been reused.
        group = os.getpgid(members.owner)
        if group != members.owner or group == os.getpgrp():
            report.failures.append(f"the tree is not in a process group of its own ({group})")
            return None
        # Owner, its writer's supervisor, the writer and clients at one instant.
        os.killpg(group, signal.SIGKILL)
        if not fleet.finish(round_clients, [owner.sentinel, *pidfds], faults.DEADLINE):
            report.failures.append(f"a member of the tree outlived the SIGKILL: {members}")
            return None
        return after_acks
    finally:
        # A tree that was not killed (the round failed) stops by itself on this.
        with contextlib.suppress(BrokenPipeError):
            control_w.send(None)
        control_w.close()
        members_r.close()
        fleet.finish(round_clients, [owner.sentinel], call_timeout + faults.DEADLINE)
        faults.reap(owner, call_timeout + faults.DEADLINE)
        for pidfd in pidfds:
            os.close(pidfd)


def _tree_owner(
    db_path: str,
    first_client: int,
    outcome_pipes: list[Connection],
    call_timeout: float,
    synchronous: str,
    members: Connection,
    control: Connection,
) -> None:
    """Child process body: own a writer and the clients, in a new process group.

    Meant to be SIGKILLed with its group. If a message comes on ``control``
    first (the parent gave up), it stops the clients and closes the writer.
    """
    os.setpgid(0, 0)  # before any child: the writer and the clients join this group
    ctx = multiprocessing.get_context("fork")
    writer = mpwriter.start(
        db_path,
        init=faults.schema_for(db_path),
        context=ctx,
        timeout=call_timeout,
        synchronous=synchronous,
    )
    until = time.monotonic() + faults.LIFETIME
    processes: list[Any] = []
    stops: list[Connection] = []
    for number, pipe in enumerate(outcome_pipes):
        client = first_client + number
        name = f"kill-writer tree client {client}"
        process, stop = faults.start_client(writer, client, pipe, until, name)
        processes.append(process)
        stops.append(stop)
    members.send(TreeMembers(os.getpid(), writer.stats()["pid"], tuple(p.pid for p in processes)))
    control.poll(faults.LIFETIME)  # killed long before, normally
    for stop in stops:
        with contextlib.suppress(BrokenPipeError):
            stop.send(None)
    for process in processes:
        faults.reap(process, call_timeout + faults.DEADLINE)
    writer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="tree kills (5)")
    faults.add_load_arguments(parser)
    parser.add_argument("--dir", default=None, help="where the database goes (default: a temp dir)")
    parser.add_argument(
        "--database", default=None, help="a postgresql:// URL instead (its items table is replaced)"
    )
    args = parser.parse_args()
    print(f"{faults.machine_line()}; synchronous={args.synchronous}, timeout {args.timeout} s")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = args.database or os.path.join(directory, "kill_tree.db")
        if args.database:
            faults.reset_postgres(args.database)
        report = run_tree(path, args.rounds, **faults.load_options(args))
        problems = _print_tree(report)
    return faults.print_verdict(problems)


def _print_tree(report: TreeKillReport) -> dict[str, Any]:
    print(f"seed:                         {report.seed}")
    print(f"tree kills:                   {len(report.rounds)}  ({report.clients} clients each)")
    for number, one in enumerate(report.rounds):
        print(
            f"  round {number}: killed after {one.after_acks} acks"
            f" ({one.acknowledged} in all this round); database: {one.audit.rows} rows,"
            f" {one.audit.unacknowledged} unacknowledged but present,"
            f" integrity {one.audit.integrity}, {one.elapsed:.2f} s"
        )
    print(f"errors by class:              {report.errors_by_class or 'none'}")
    print(f"max call duration:            {report.max_call:.3f} s")
    print(f"elapsed:                      {report.elapsed:.2f} s")
    return report.problems()


if __name__ == "__main__":
    sys.exit(main())
