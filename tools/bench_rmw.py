"""Read-modify-write ("bank"): transfers between accounts, checked afterwards.

``accounts(id, balance)`` starts with ACCOUNTS accounts of INITIAL_BALANCE each;
``ledger(src, dst, amount, client)`` records every transfer. One operation picks
two distinct random accounts and an amount, reads both balances, and -- if the
source has the funds -- writes both new balances (computed here, in Python:
that is what makes it read-modify-write) and a ledger row, in one transaction.
It returns True if it moved money, False if it declined.

  rmw-mpwriter         writer.call(transfer, ...): the function runs in the writer
  rmw-naive-default    a connection per process with Python's default (legacy)
                       isolation_level: the SELECTs run outside any transaction and
                       the first UPDATE opens a deferred one, so two clients can
                       read the same balance and both write theirs (lost update)
  rmw-naive-immediate  a connection per process: BEGIN IMMEDIATE; reads; writes; COMMIT

After each run: the money must be conserved (sum of balances == initial total),
no balance may be negative, every balance must equal what the ledger says, and
the ledger must hold one row per transfer acknowledged as done. naive-default
is EXPECTED to break the first three now and then: that is the comparison.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
from collections.abc import Callable
from contextlib import closing
from functools import partial
from typing import Any

import _benchlib as lib
import mpwriter

MODES = ("rmw-mpwriter", "rmw-naive-default", "rmw-naive-immediate")
RACY_MODE = "rmw-naive-default"  # expected to break the money invariants
ACCOUNTS = 100
INITIAL_BALANCE = 1000
INITIAL_TOTAL = ACCOUNTS * INITIAL_BALANCE
MAX_AMOUNT = 100
SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ledger(
    id INTEGER PRIMARY KEY, src INTEGER NOT NULL, dst INTEGER NOT NULL,
    amount INTEGER NOT NULL, client INTEGER NOT NULL
);
"""
BALANCE = "SELECT balance FROM accounts WHERE id = ?"
SET_BALANCE = "UPDATE accounts SET balance = ? WHERE id = ?"
RECORD = "INSERT INTO ledger(src, dst, amount, client) VALUES (?, ?, ?, ?)"


def transfer(conn: sqlite3.Connection, src: int, dst: int, amount: int, client: int) -> bool:
    """Move ``amount`` from ``src`` to ``dst`` if ``src`` has it; record it in the ledger.

    Module-level, so that the writer can import it for `Writer.call`. The caller
    provides the transaction (or, for naive-default, does not quite).
    """
    (have,) = conn.execute(BALANCE, (src,)).fetchone()
    (theirs,) = conn.execute(BALANCE, (dst,)).fetchone()
    if have < amount:
        return False
    conn.execute(SET_BALANCE, (have - amount, src))
    conn.execute(SET_BALANCE, (theirs + amount, dst))
    conn.execute(RECORD, (src, dst, amount, client))
    return True


def pick(rng: random.Random) -> tuple[int, int, int]:
    src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
    return src, dst, rng.randint(1, MAX_AMOUNT)


def via_writer(writer: mpwriter.Writer, rng: random.Random, client: int) -> bool:
    moved: bool = writer.call(transfer, *pick(rng), client)
    return moved


def naive_default(conn: sqlite3.Connection, rng: random.Random, client: int) -> bool:
    """Python's legacy implicit transactions: BEGIN (deferred) before the first UPDATE."""
    try:
        moved = transfer(conn, *pick(rng), client)
        conn.commit()  # a no-op when it declined (only SELECTs ran)
    except BaseException:
        conn.rollback()
        raise
    return moved


def naive_immediate(conn: sqlite3.Connection, rng: random.Random, client: int) -> bool:
    try:
        conn.execute("BEGIN IMMEDIATE")
        moved = transfer(conn, *pick(rng), client)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return moved


def make_ops(
    mode: str, path: str, sync: str, clients: list[int], writer: Any
) -> tuple[list[lib.Op], Callable[[], None]]:
    """In a client process: one transfer operation per client id, and a cleanup."""
    # Each random.Random() is seeded from os.urandom here, after the fork:
    # forked clients would otherwise share the parent's random sequence.
    if mode == "rmw-mpwriter":
        return [partial(via_writer, writer, random.Random(), c) for c in clients], lambda: None
    if mode == "rmw-naive-default":
        # isolation_level left at Python's default (""): legacy implicit transactions.
        conn = sqlite3.connect(path, timeout=lib.BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.execute(f"PRAGMA busy_timeout={lib.BUSY_TIMEOUT_MS}")
        run: Callable[..., bool] = naive_default
    else:
        conn = lib.open_connection(path, sync)
        run = naive_immediate
    return [partial(run, conn, random.Random(), c) for c in clients], conn.close


# -- one run ----------------------------------------------------------------------------


def seed(path: str, sync: str) -> None:
    with closing(lib.open_connection(path, sync)) as conn:
        conn.executescript(SCHEMA)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO accounts(id, balance) VALUES (?, ?)",
            [(i, INITIAL_BALANCE) for i in range(1, ACCOUNTS + 1)],
        )
        conn.execute("COMMIT")


def audit(path: str) -> dict[str, int]:
    """The invariants' figures, read after the run."""
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        balances = dict(conn.execute("SELECT id, balance FROM accounts"))
        expected = dict.fromkeys(balances, INITIAL_BALANCE)
        ledger_rows = 0
        for src, dst, amount in conn.execute("SELECT src, dst, amount FROM ledger"):
            expected[src] -= amount
            expected[dst] += amount
            ledger_rows += 1
    return {
        "total": sum(balances.values()),
        "money_delta": sum(balances.values()) - INITIAL_TOTAL,
        "negative_accounts": sum(b < 0 for b in balances.values()),
        "off_ledger_accounts": sum(balances[a] != expected[a] for a in balances),
        "ledger_rows": ledger_rows,
    }


def run_once(mode: str, sync: str, clients: int, duration: float, base_dir: str) -> lib.Run:
    factory = partial(make_ops, mode)
    groups = [[c] for c in range(clients)]
    stats: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="mpwbench-rmw-", dir=base_dir) as tmp:
        path = os.path.join(tmp, "bank.db")
        seed(path, sync)
        if mode != "rmw-mpwriter":
            summaries, began, problems = lib.run_clients(factory, path, sync, groups, duration)
        else:
            writer = lib.start_writer(path, sync)
            try:
                summaries, began, problems = lib.run_clients(
                    factory, path, sync, groups, duration, writer
                )
                stats = lib.final_stats(writer, problems)
            finally:
                writer.close(timeout=30.0)
        figures = audit(path)
    run = {"workload": "rmw", "mode": mode, "sync": sync}
    run |= lib.summarize(summaries, clients, began, problems) | figures
    run["mean_batch_size"] = stats["mean_batch_size"] if stats else None
    run["writer_stats"] = stats
    run["writer_max_ms"] = lib.writer_max_ms(stats)
    run["violations"] = violations(run)
    return run


def violations(run: lib.Run) -> list[str]:
    """What broke, in words; empty when every invariant held."""
    out = []
    if run["money_delta"]:
        verb = "created" if run["money_delta"] > 0 else "destroyed"
        out.append(f"money {verb}: {abs(run['money_delta'])} (total {run['total']})")
    if run["negative_accounts"]:
        out.append(f"{run['negative_accounts']} account(s) overdrawn")
    if run["off_ledger_accounts"]:
        out.append(f"{run['off_ledger_accounts']} balance(s) disagree with the ledger")
    if run["ledger_rows"] != run["applied"]:
        out.append(
            f"ledger holds {run['ledger_rows']} rows for {run['applied']} acknowledged transfers"
        )
    return out


def check(run: lib.Run) -> bool:
    """One progress line, loud lines for violations; True when the run is sound.

    naive-default's money violations are expected and do not make it unsound.
    """
    name = lib.run_name(run)
    errors = sum(run["errors"].values())
    print(
        f"  {name:32} {run['ops_per_s']:7.0f} tx/s  done={run['acked']} moved={run['applied']}"
        f" ledger={run['ledger_rows']} errors={errors}",
        flush=True,
    )
    sound = not run["problems"]
    for violation in run["violations"]:
        expected = run["mode"] == RACY_MODE and not violation.startswith("ledger")
        sound = sound and expected
        tag = "(expected: its reads run outside the transaction)" if expected else "***"
        print(f"  *** VIOLATION {name}: {violation} {tag}", flush=True)
    for problem in run["problems"]:
        print(f"  *** PROBLEM {name}: {problem} ***", flush=True)
    return sound


def configurations(clients: list[int], sync: str) -> list[tuple[str, str, int]]:
    return [(mode, sync, n) for n in clients for mode in MODES]


def table(results: dict[tuple[str, str, int], list[lib.Run]]) -> list[dict[str, Any]]:
    immediate = lib.median_rates(results, "rmw-naive-immediate")
    rows = []
    for (mode, sync, clients), runs in results.items():
        mismatches = sum(r["ledger_rows"] != r["applied"] for r in runs)
        row = lib.table_row((mode, sync, clients), runs, mismatches)
        row["violating_runs"] = sum(bool(r["violations"]) for r in runs)
        row["money_deltas"] = [r["money_delta"] for r in runs]
        for key in ("ops_per_s", "applied", "p50_ms", "p99_ms", "fairness", "mean_batch_size"):
            row[key] = lib.median_of(runs, key)
        row["max_ms"] = max(r["max_ms"] for r in runs)
        row["writer_max_ms"] = max(
            (r["writer_max_ms"] for r in runs if r["writer_max_ms"] is not None), default=None
        )
        row |= lib.spread_of(runs)
        baseline = immediate.get((sync, clients))
        row["vs_immediate"] = row["ops_per_s"] / baseline if baseline else None
        rows.append(row)
    return rows


def _deltas(row: dict[str, Any]) -> str:
    return ",".join(f"{d:+d}" if d else "0" for d in row["money_deltas"])


COLUMNS: list[lib.Column] = [
    *lib.lead_columns(-19, "tx/s", 7),
    ("vs imm", 6, lambda r: lib.cell(r["vs_immediate"], ".2f")),
    ("bad runs", 8, lambda r: f"{r['violating_runs']}/{r['runs']}"),
    ("money delta/run", -16, _deltas),
]
