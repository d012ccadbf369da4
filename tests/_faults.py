"""What the fault tools and the test suite share: the table, the clients, the audit.

The clients of tests/kill_writer.py and tests/kill_tree.py are forked processes
sharing one `mpwriter.Writer`; each inserts ``(client, seq)`` for seq = 0, 1,
2... one call at a time (`client_loop`) and reports every call on a pipe of its
own as an `Outcome`: the seq, how long the call took, and the error it raised
if it did not return. A call that returned is an *acknowledgement*. A `Fleet`
reads those pipes in the process that injects the faults, and `audit` checks
the database against what it read: every acknowledged row present, ``PRAGMA
integrity_check`` ok, and a row without an acknowledgement explained by a call
told "the outcome is unknown" or by the call a killed client had in flight.

Also here: the table (`SCHEMA`, `INSERT`), `reap`, and the pieces of the
tools' command lines that they share.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import re
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

import mpwriter

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    client INTEGER,
    seq INTEGER,
    payload TEXT,
    UNIQUE (client, seq)
);
"""
INSERT = "INSERT INTO items(client, seq) VALUES (?, ?)"
# The same table on PostgreSQL (--database postgresql://...).
PG_SCHEMA = SCHEMA.replace("id INTEGER PRIMARY KEY", "id SERIAL PRIMARY KEY")
PG_SCHEMES = ("postgresql://", "postgres://")


def schema_for(database: str | os.PathLike[str]) -> str:
    """The `items` table's schema for the database's engine."""
    return PG_SCHEMA if os.fspath(database).startswith(PG_SCHEMES) else SCHEMA


def reset_postgres(url: str) -> None:
    """Drop and recreate `items` on a PostgreSQL database: each run audits its own rows."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute(PG_SCHEMA.encode())


# Errors a writer kill may cause: the call that the dead writer had taken
# ("outcome unknown"), or a call that outwaited a restart. Anything else is a bug.
ALLOWED_ERRORS = frozenset({"WriterCrashed", "Timeout"})
OVERRUN_MARGIN = 1.0  # seconds past its timeout that a call may take to return
DEADLINE = 10.0  # for every wait on a child or a restart, beyond the call timeout
LIFETIME = 600.0  # a client stops by itself after this long, whatever its parent does
_NOT_SENT = re.compile(r"not sent")
_OUTCOME = re.compile(r"outcome is unknown|not sent")  # every allowed error says which


def reap(process: Any, timeout: float = 10.0) -> None:
    """Join a child with escalation: wait, terminate, kill; never hang.

    Not join(0) after the sentinel fires: the sentinel fires as the child
    closes its descriptors, a moment before its exit status can be collected
    (waitpid(WNOHANG) would leave exitcode None and a zombie behind).
    """
    for stop in (None, process.terminate, process.kill):
        if stop is not None:
            stop()
        if wait([process.sentinel], timeout):
            process.join(timeout)
            return
    raise RuntimeError(f"process {process.pid} would not die")


# -- the clients and what they report ----------------------------------------------


class Outcome(NamedTuple):
    """One call, as its client reports it. ``error`` is None for an acknowledgement.

    Small enough to be one write(2) below PIPE_BUF: a SIGKILL lands before
    the report or after it, never in the middle.
    """

    seq: int
    started: float  # time.monotonic(), which is system-wide: comparable across processes
    seconds: float
    error: str | None = None  # the exception's class name
    message: str = ""


def client_loop(
    writer: mpwriter.Writer,
    client: int,
    outcomes: Connection,
    control: Connection,
    until: float,
) -> None:
    """Child process body: insert seq 0, 1, 2... and report each call's `Outcome`.

    A seq is never retried: a call that failed with "outcome unknown" may have
    committed, and its row must stay attributable to that call. Any message
    on ``control`` (or its EOF) means "stop after this call"; ``until`` (a
    monotonic time, which is system-wide) bounds the loop if nobody says so.
    """
    seq = 0
    while not control.poll() and time.monotonic() < until:
        began = time.monotonic()
        try:
            writer.execute(INSERT, (client, seq))
        except Exception as exc:
            ended = time.monotonic()
            outcome = Outcome(seq, began, ended - began, type(exc).__name__, str(exc)[:300])
        else:
            outcome = Outcome(seq, began, time.monotonic() - began)
        outcomes.send(outcome)
        seq += 1


def start_client(
    writer: mpwriter.Writer, client: int, outcomes: Connection, until: float, name: str
) -> tuple[Any, Connection]:
    """Fork a `client_loop` that reports on ``outcomes`` (a write end); return it and its control.

    Anything sent on the returned control connection (or its closing) tells
    the client to stop after its call in hand.
    """
    ctx = multiprocessing.get_context("fork")
    control_r, control_w = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=client_loop,
        args=(writer, client, outcomes, control_r, until),
        name=name,
        daemon=True,
    )
    process.start()
    # Closed here, once the child has it, so that EOF on the read end means
    # the client is gone, and so is everything it sent (but see Fleet.finish).
    outcomes.close()
    control_r.close()
    return process, control_w


@dataclass
class ClientLog:
    """Everything one client reported."""

    acked: set[int] = field(default_factory=set)
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)  # seq -> (class, message)
    last_seq: int = -1  # the last seq reported either way
    last_ack_start: float = 0.0
    killed: bool = False  # SIGKILLed: its call in flight went unreported

    def take(self, outcome: Outcome) -> None:
        if outcome.error is None:
            self.acked.add(outcome.seq)
            self.last_ack_start = outcome.started
        else:
            self.failed[outcome.seq] = (outcome.error, outcome.message)
        self.last_seq = outcome.seq


@dataclass
class Audit:
    """The database checked against what the clients reported."""

    rows: int
    integrity: str
    lost: list[tuple[int, int]]  # acknowledged, yet missing
    unacknowledged: int  # present without an acknowledgement, and explained
    contradicted: list[str]  # present although the call said "not sent"
    unexplained: list[tuple[int, int]]  # present, and no call can account for it


def audit(db_path: str | os.PathLike[str], logs: dict[int, ClientLog], *, in_flight: bool) -> Audit:
    """Open the database with plain sqlite3 and check it against ``logs``.

    A row present without an acknowledgement is explained by a call that
    raised "outcome unknown", or by the call a killed client had in flight
    (the seq after its last report): ``in_flight`` says every client was killed.
    """
    found: dict[int, set[int]] = defaultdict(set)
    if os.fspath(db_path).startswith(PG_SCHEMES):
        # The server's own recovery already ran; its constraints hold at COMMIT.
        with mpwriter.reader(os.fspath(db_path)) as pg:
            for client, seq in pg.execute("SELECT client, seq FROM items"):
                found[client].add(seq)
        integrity = "ok"
    else:
        # Plain sqlite3, read-write: what an application restarted after a crash
        # does, and what lets SQLite recover a WAL left by a killed writer.
        with closing(sqlite3.connect(os.fspath(db_path), timeout=DEADLINE)) as conn:
            integrity = "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
            for client, seq in conn.execute("SELECT client, seq FROM items"):
                found[client].add(seq)
    rows = sum(len(seqs) for seqs in found.values())
    lost: list[tuple[int, int]] = []
    contradicted: list[str] = []
    unexplained: list[tuple[int, int]] = []
    unacknowledged = 0
    for client in sorted(set(logs) | set(found)):
        log = logs.get(client, ClientLog())
        present = found.get(client, set())
        lost += [(client, seq) for seq in sorted(log.acked - present)]
        for seq in sorted(present - log.acked):
            failure = log.failed.get(seq)
            if failure is not None and _NOT_SENT.search(failure[1]):
                contradicted.append(f"({client}, {seq}) is present: {failure[0]}: {failure[1]}")
            elif failure is not None or ((in_flight or log.killed) and seq == log.last_seq + 1):
                unacknowledged += 1
            else:
                unexplained.append((client, seq))
    return Audit(rows, integrity, lost, unacknowledged, contradicted, unexplained)


class Fleet:
    """The clients' report pipes, as seen by the process that reads them."""

    def __init__(self, call_timeout: float) -> None:
        self.call_timeout = call_timeout
        self.logs: dict[int, ClientLog] = {}
        self.pipes: dict[Connection, int] = {}  # open report pipe -> client
        self.acknowledged = 0
        self.calls = 0
        self.errors: Counter[str] = Counter()
        self.unexpected_errors: list[str] = []
        self.max_call = 0.0
        self.overruns: list[str] = []  # calls that outlived their timeout + margin
        self.eof_expected: set[int] = set()  # clients told to stop, or killed
        self.exited: list[int] = []  # clients whose pipe closed unexpectedly
        self.latest_ack_start = 0.0  # when the most recently begun acknowledged call began
        self.crashes: list[tuple[str, float, float]] = []  # WriterCrashed: (what, start, end)

    def add(self, client: int, pipe: Connection) -> None:
        self.logs[client] = ClientLog()
        self.pipes[pipe] = client

    def pump(self, timeout: float, until: Callable[[], bool] | None = None) -> bool:
        """Take reports for up to ``timeout`` seconds (a wait, not a sleep).

        Returns early, True, once ``until()`` holds; False if it never did.
        """
        deadline = time.monotonic() + timeout
        while True:
            if until is not None and until():
                return True
            remaining = deadline - time.monotonic()
            for pipe in wait(list(self.pipes), max(0.0, remaining)):
                assert isinstance(pipe, Connection)
                self._drain(pipe)
            if remaining <= 0 or not self.pipes:
                return until is not None and until()

    def _drain(self, pipe: Connection) -> None:
        client = self.pipes[pipe]
        while pipe.poll():
            try:
                outcome: Outcome = pipe.recv()
            except EOFError:
                del self.pipes[pipe]
                pipe.close()
                if client not in self.eof_expected:
                    self.exited.append(client)
                return
            self.calls += 1
            self.max_call = max(self.max_call, outcome.seconds)
            if outcome.seconds > self.call_timeout + OVERRUN_MARGIN:
                self.overruns.append(f"client {client} seq {outcome.seq}: {outcome.seconds:.2f} s")
            if outcome.error is None:
                self.acknowledged += 1
                self.latest_ack_start = max(self.latest_ack_start, outcome.started)
            else:
                if outcome.error == "WriterCrashed":
                    what = f"client {client} seq {outcome.seq}: {outcome.message}"
                    self.crashes.append((what, outcome.started, outcome.started + outcome.seconds))
                self.errors[outcome.error] += 1
                if outcome.error not in ALLOWED_ERRORS or not _OUTCOME.search(outcome.message):
                    self.unexpected_errors.append(
                        f"client {client} seq {outcome.seq}: {outcome.error}: {outcome.message}"
                    )
            self.logs[client].take(outcome)

    def finish(self, clients: set[int], sentinels: list[int], timeout: float) -> bool:
        """Read the reports of ``clients`` until every process behind ``sentinels`` has exited.

        Then take what is left in their pipes and close them. Not EOF: a
        forked process inherits every descriptor open at the fork, so a
        sibling or a restarted writer may hold a copy of a pipe's write end.
        A sentinel is a process sentinel or a pidfd; False if one outlives
        ``timeout``.
        """
        self.eof_expected |= clients
        pending = set(sentinels)
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            mine = [pipe for pipe, client in self.pipes.items() if client in clients]
            for ready in wait([*mine, *pending], remaining):
                if isinstance(ready, Connection):
                    self._drain(ready)
                else:
                    pending.discard(ready)  # a sentinel: an int
        for pipe, client in list(self.pipes.items()):
            if client in clients:
                self._drain(pipe)  # everything the dead wrote is there already
                if pipe in self.pipes:
                    del self.pipes[pipe]
                    pipe.close()
        return not pending


# -- command lines -------------------------------------------------------------------


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of the load that kill_writer.py and kill_tree.py put under their kills.

    --clients, --seed, --max-pause, --timeout and --synchronous, named as the
    keyword arguments of their ``run`` functions (``--timeout`` is ``call_timeout``).
    """
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-pause", type=float, default=0.03, help="seconds before a kill, max")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call timeout (5 s)")
    parser.add_argument("--synchronous", default="NORMAL", choices=["NORMAL", "FULL", "EXTRA"])


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of `add_load_arguments`, as keyword arguments of ``run``/``run_tree``."""
    return {
        "clients": args.clients,
        "seed": args.seed,
        "max_pause": args.max_pause,
        "call_timeout": args.timeout,
        "synchronous": args.synchronous,
    }


def machine_line() -> str:
    """The first line a fault tool prints: the machine, Python and SQLite it ran on."""
    return (
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs;"
        f" Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


def print_verdict(problems: dict[str, Any]) -> int:
    """Print a FAIL line for each of ``problems``, then FAIL or OK; return the exit status.

    ``problems`` maps what went wrong to the evidence, and holds only what
    did go wrong: empty means OK, and status 0.
    """
    for name, what in problems.items():
        print(f"FAIL {name}: {what}")
    print("FAIL" if problems else "OK")
    return 1 if problems else 0
