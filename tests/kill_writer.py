"""SIGKILLs of the writer under load: no acknowledged write may be lost.

Two faults, one bookkeeping, in tests/_faults.py. Clients are forked
processes sharing one `mpwriter.Writer`; each inserts ``(client, seq)`` for
seq = 0, 1, 2... one call at a time and reports every call on a pipe of its
own. A call that returned is an *acknowledgement*. Afterwards the database
must hold every acknowledged row, ``PRAGMA integrity_check`` must say ok, and
a row that is there without an acknowledgement must belong to a call whose
error said "the outcome is unknown", or be the call that a killed client had
in flight.

- `run` (writer kills): this process owns the writer. It waits on the
  clients' pipes for a random deadline in ``[0, max_pause]``, SIGKILLs the
  *current* writer process, and waits -- on those pipes, with a deadline --
  until a new writer has acknowledged a call sent after the kill; ``kills``
  times, with ``client_kills`` SIGKILLs of a random client (replaced at once)
  shuffled in. Every call must end within its timeout (plus a second), and the
  only errors allowed are `WriterCrashed` and `Timeout`, saying whether the
  request was sent: a kill may cost a call its answer, never its bounded wait.
  A `WriterCrashed` that no writer kill overlapped is counted apart: it blames
  a death that did not happen.
- `kill_tree.run_tree` (tree kills, in tests/kill_tree.py, on the same
  bookkeeping): a child process owns the writer and its clients, in
  a process group of their own; the clients report straight to this process.
  After a random number of acknowledgements the whole group -- owner, writer,
  clients -- is SIGKILLed at once, and the database is opened with plain
  sqlite3, as an application restarted after a crash would. The next round
  starts a new tree on the same file, so rows acknowledged in every earlier
  round are checked again.

With ``synchronous=NORMAL`` in WAL mode a committed transaction is in the OS
page cache when COMMIT returns: it survives a crash of any process (what is
tested here), not a power loss (that needs FULL, and cannot be tested here).

tests/test_durability.py runs both with small figures; this script runs more
and prints them (a stress tool: it never gates the build):

  PYTHONPATH=. python3 tests/kill_writer.py                    # 25 writer kills
  PYTHONPATH=. python3 tests/kill_writer.py --kills 20 --client-kills 200
  PYTHONPATH=. python3 tests/kill_writer.py --kills 100 --clients 8

A writer that had served is replaced at once (mpwriter's restart policy), so
with default settings each kill should be followed by a fresh acknowledgement
within a second and no call should time out; the verdict counts both.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import random
import select
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import _faults as faults
import mpwriter
from _faults import OVERRUN_MARGIN as OVERRUN_MARGIN  # tests/test_durability.py reads it here
from mpwriter import testing

# -- writer kills ------------------------------------------------------------------

RESUMPTION_TARGET = 1.0  # seconds from a writer kill to a call served by its successor


@dataclass
class WriterKillReport:
    """What `run` saw; ``audit`` is the database checked afterwards."""

    seed: int
    clients: int
    kills: int = 0
    client_kills: int = 0
    restarts: int = 0
    acknowledged: int = 0
    calls: int = 0
    errors_by_class: dict[str, int] = field(default_factory=dict)
    # Not WriterCrashed/Timeout, or one that does not say whether it was sent.
    unexpected_errors: list[str] = field(default_factory=list)
    max_call: float = 0.0
    overruns: list[str] = field(default_factory=list)  # calls past their timeout + 1 s
    max_restart: float = 0.0  # longest time from a kill to an acknowledgement by the new writer
    resumptions: list[float] = field(default_factory=list)  # that time, for each kill
    kill_windows: list[tuple[float, float]] = field(default_factory=list)  # (SIGKILL sent, dead)
    # WriterCrashed raised by a call during which no writer died: the error
    # blames a death that did not happen (see _crashes_without_a_death).
    crashes_without_a_death: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the run itself went wrong
    writer_stats: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0
    audit: faults.Audit | None = None

    def problems(self) -> dict[str, Any]:
        """Every property that does not hold, by name; empty when all is well."""
        assert self.audit is not None
        found: dict[str, Any] = {
            "run failures": self.failures,
            "lost acknowledged rows": self.audit.lost,
            "rows present although 'not sent'": self.audit.contradicted,
            "unexplained rows": self.audit.unexplained,
            "errors other than WriterCrashed/Timeout": self.unexpected_errors,
            "calls past their timeout": self.overruns,
        }
        if self.audit.integrity != "ok":
            found["integrity_check"] = [self.audit.integrity]
        slow = [f"{r:.3f} s" for r in self.resumptions if r >= RESUMPTION_TARGET]
        if slow:
            found[f"kill-to-fresh-ack of {RESUMPTION_TARGET:g} s or more"] = slow
        if self.errors_by_class.get("Timeout"):
            found["Timeout errors"] = [str(self.errors_by_class["Timeout"])]
        if self.restarts != self.kills:
            found["restarts != kills"] = [f"{self.restarts} restarts for {self.kills} kills"]
        return {name: what for name, what in found.items() if what}


class _Clients:
    """The clients of `run`, forked by the writer's owner: start, kill and replace, stop."""

    def __init__(
        self, writer: mpwriter.Writer, fleet: faults.Fleet, report: WriterKillReport
    ) -> None:
        self._writer = writer
        self._fleet = fleet
        self._report = report
        self._ctx = multiprocessing.get_context("fork")
        self._ids = itertools.count()
        self._until = time.monotonic() + faults.LIFETIME
        self.live: dict[int, tuple[Any, Connection]] = {}  # client -> (process, control)

    def start(self) -> None:
        client = next(self._ids)
        outcomes_r, outcomes_w = self._ctx.Pipe(duplex=False)
        name = f"kill-writer client {client}"
        process, control = faults.start_client(self._writer, client, outcomes_w, self._until, name)
        self._fleet.add(client, outcomes_r)
        self.live[client] = (process, control)

    def kill_one(self, rng: random.Random) -> bool:
        """SIGKILL a random client, read its last reports, reap it, start a replacement."""
        client = rng.choice(sorted(self.live))
        process, control = self.live.pop(client)
        process.kill()
        self._fleet.finish({client}, [process.sentinel], faults.DEADLINE)
        faults.reap(process)
        control.close()
        self._fleet.logs[client].killed = True
        self._report.client_kills += 1
        if process.exitcode != -signal.SIGKILL:
            self._report.failures.append(f"killed client {client}: exit code {process.exitcode}")
            return False
        self.start()
        return True

    def stop(self, timeout: float) -> None:
        """Tell every client to stop after its call in hand, read its reports, reap it."""
        for _, control in self.live.values():
            with contextlib.suppress(BrokenPipeError):  # it may have exited already
                control.send(None)
        sentinels = [process.sentinel for process, _ in self.live.values()]
        if not self._fleet.finish(set(self.live), sentinels, timeout):
            self._report.failures.append(f"clients still running {timeout} s after 'stop'")
        for client, (process, control) in self.live.items():
            faults.reap(process)
            control.close()
            if process.exitcode != 0:
                self._report.failures.append(f"client {client}: exit code {process.exitcode}")
        self.live.clear()


def run(
    db_path: str | os.PathLike[str],
    kills: int,
    clients: int = 4,
    *,
    client_kills: int = 0,
    seed: int | None = None,
    max_pause: float = 0.03,
    call_timeout: float = 5.0,
    synchronous: str = "NORMAL",
    restart_backoff_max: float | None = None,
) -> WriterKillReport:
    """Start a writer on ``db_path``, run ``clients`` clients, SIGKILL the writer ``kills`` times.

    Each kill comes after a random wait in ``[0, max_pause]`` on the clients'
    pipes, and the next one only once the new writer has acknowledged a call
    sent after the kill (so every kill lands under load). ``client_kills``
    SIGKILLs of a random client (replaced at once) are shuffled in among them.
    Then the clients stop, the writer closes, and the database is audited.
    The writer runs with mpwriter's default restart settings, but for
    ``restart_backoff_max`` if given.
    """
    report = WriterKillReport(
        seed=random.randrange(1 << 32) if seed is None else seed, clients=clients
    )
    rng = random.Random(report.seed)
    fleet = faults.Fleet(call_timeout)
    started = time.monotonic()
    options = {} if restart_backoff_max is None else {"restart_backoff_max": restart_backoff_max}
    writer = mpwriter.start(
        db_path,
        init=faults.schema_for(db_path),
        context="fork",
        timeout=call_timeout,
        synchronous=synchronous,
        **options,
    )
    try:
        pool = _Clients(writer, fleet, report)
        try:
            for _ in range(clients):
                pool.start()
            _kill_loop(writer, fleet, pool, report, rng, kills, client_kills, max_pause)
        finally:
            # A client finishes the call in hand first: up to its timeout.
            pool.stop(call_timeout + faults.DEADLINE)
        report.failures += [f"client {c} exited by itself" for c in fleet.exited]
        report.restarts = testing.shared_state(writer).restarts
        try:
            report.writer_stats = writer.stats(timeout=call_timeout)
        except mpwriter.Error as exc:
            report.failures.append(f"stats() after the kills: {type(exc).__name__}: {exc}")
    finally:
        writer.close(timeout=call_timeout + faults.DEADLINE)
    report.elapsed = time.monotonic() - started
    report.acknowledged = fleet.acknowledged
    report.calls = fleet.calls
    report.errors_by_class = dict(fleet.errors)
    report.unexpected_errors = fleet.unexpected_errors
    report.max_call = fleet.max_call
    report.overruns = fleet.overruns
    report.crashes_without_a_death = _crashes_without_a_death(fleet.crashes, report.kill_windows)
    report.audit = faults.audit(db_path, fleet.logs, in_flight=False)
    return report


def _crashes_without_a_death(
    crashes: list[tuple[str, float, float]], kill_windows: list[tuple[float, float]]
) -> list[str]:
    """The WriterCrashed calls that no writer kill overlapped.

    A call can be told "the writer died" only if a writer died while it was
    in progress: between the SIGKILL being sent and the death being seen.
    """
    return [
        what
        for what, start, end in crashes
        if not any(start <= dead and sent <= end for sent, dead in kill_windows)
    ]


def _kill_loop(
    writer: mpwriter.Writer,
    fleet: faults.Fleet,
    pool: _Clients,
    report: WriterKillReport,
    rng: random.Random,
    kills: int,
    client_kills: int,
    max_pause: float,
) -> None:
    """The kills of `run`, in random order; stops at the first that goes wrong."""
    if not fleet.pump(faults.DEADLINE, until=lambda: fleet.acknowledged > 0):
        report.failures.append("no acknowledgement before the first kill")
        return
    writer_kills = [True] * kills + [False] * client_kills
    rng.shuffle(writer_kills)
    for of_writer in writer_kills:
        fleet.pump(rng.uniform(0.0, max_pause))
        done = _kill_writer_once(writer, fleet, report) if of_writer else pool.kill_one(rng)
        if not done:
            return
    # Every client still gets its writes through, replacements included.
    last = time.monotonic()

    def idle() -> list[int]:
        return [c for c in pool.live if fleet.logs[c].last_ack_start <= last]

    fleet.pump(writer.timeout + faults.DEADLINE, until=lambda: not idle())
    report.failures += [f"client {c}: no acknowledgement after the last kill" for c in idle()]


def _kill_writer_once(
    writer: mpwriter.Writer, fleet: faults.Fleet, report: WriterKillReport
) -> bool:
    """SIGKILL the current writer and wait until its successor serves the clients."""
    # Only a writer that has served a call is killed (the restart wait below),
    # so writer_pid names a live child of this process, not a pid from the past.
    state = testing.shared_state(writer)
    victim = state.writer_pid
    sent = time.monotonic()
    if not _sigkill(victim, faults.DEADLINE):
        report.failures.append(f"writer {victim} did not die within {faults.DEADLINE} s")
        return False
    dead = time.monotonic()
    report.kill_windows.append((sent, dead))
    report.kills += 1

    # Restarted and serving: a call that began after the victim was dead has
    # been acknowledged, which only a new writer can have done. Judged from
    # the clients' acknowledgements, not a stats() call from here: that would
    # first take this process's own pooled pipe through a re-registration, a
    # restart path of its own beside the one being measured.
    deadline = dead + writer.timeout + faults.DEADLINE
    if not fleet.pump(deadline - time.monotonic(), until=lambda: fleet.latest_ack_start > dead):
        report.failures.append(f"no new writer served {deadline - sent:.0f} s after a kill")
        return False
    report.resumptions.append(time.monotonic() - sent)
    report.max_restart = max(report.max_restart, report.resumptions[-1])
    if state.writer_pid == victim:
        report.failures.append(f"calls were served, but writer_pid still names {victim}")
        return False
    return True


def _sigkill(pid: int, timeout: float) -> bool:
    """SIGKILL ``pid`` and wait until it has exited; False if it outlives ``timeout``.

    Through a pidfd, which stays bound to this process even if it is reaped
    (by the owner's supervisor) and its pid reused meanwhile.
    """
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


# -- command line -------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=25, help="writer kills (25)")
    parser.add_argument(
        "--client-kills", type=int, default=0, help="client kills shuffled in among them (0)"
    )
    faults.add_load_arguments(parser)
    parser.add_argument(
        "--backoff-max",
        type=float,
        default=None,
        help="start()'s restart_backoff_max (default: mpwriter's own, 30 s)",
    )
    parser.add_argument("--dir", default=None, help="where the database goes (default: a temp dir)")
    parser.add_argument(
        "--database", default=None, help="a postgresql:// URL instead (its items table is replaced)"
    )
    args = parser.parse_args()

    print(f"{faults.machine_line()}; synchronous={args.synchronous}, timeout {args.timeout} s")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = args.database or os.path.join(directory, "kill_writer.db")
        if args.database:
            faults.reset_postgres(args.database)
        report = run(
            path,
            args.kills,
            client_kills=args.client_kills,
            restart_backoff_max=args.backoff_max,
            **faults.load_options(args),
        )
        problems = _print_kills(report)
    return faults.print_verdict(problems)


def _print_kills(report: WriterKillReport) -> dict[str, Any]:
    assert report.audit is not None
    stats = report.writer_stats
    print(f"seed:                         {report.seed}")
    print(f"writer kills:                 {report.kills}  ({report.clients} clients)")
    print(f"client kills:                 {report.client_kills}")
    print(f"restarts:                     {report.restarts}")
    print(f"calls:                        {report.calls}")
    print(f"acknowledged:                 {report.acknowledged}")
    print(f"rows:                         {report.audit.rows}")
    print(
        f"unacknowledged but present:   {report.audit.unacknowledged}"
        "  (outcome unknown, or in flight in a killed client)"
    )
    print(f"errors by class:              {report.errors_by_class or 'none'}")
    print(f"max call duration:            {report.max_call:.3f} s")
    print(f"max kill-to-fresh-ack:        {report.max_restart:.3f} s")
    if report.resumptions:
        ordered = sorted(report.resumptions)
        over = sum(1 for r in ordered if r >= 1.0)
        print(
            f"kill-to-fresh-ack:            median {ordered[len(ordered) // 2]:.3f} s,"
            f" {over} of {len(ordered)} at 1 s or more"
        )
    print(
        f"WriterCrashed with no death:  {len(report.crashes_without_a_death)}"
        "  (calls told 'the writer died' while no writer died)"
    )
    for what in report.crashes_without_a_death[:5]:
        print(f"    {what}")
    print(f"integrity_check:              {report.audit.integrity}")
    print(
        f"last writer: lost requests    {stats.get('lost_requests')},"
        f" errors {stats.get('errors_by_class') or 'none'}"
    )
    print(f"elapsed:                      {report.elapsed:.2f} s")
    return report.problems()


if __name__ == "__main__":
    sys.exit(main())
