"""ORM bank transfers from several processes: stock sqlite:// against sqlite+mpwriter://.

Each process loops for the given seconds: ``Session.begin()``, read both
balances, update both, add two ledger rows. Three engines, each run with every
process count and ``synchronous`` value asked for, interleaved:

  stock      ``create_engine("sqlite:///...")`` as it comes (deferred
             transactions, pysqlite's defaults): lost updates, reported;
  immediate  the stock engine with SQLAlchemy's documented recipe for
             SQLite (the driver's transaction handling off, ``BEGIN
             IMMEDIATE`` on each begin), timeout 5 s;
  mpwriter   ``sqlite+mpwriter:///...`` (transactions are writer sessions).

Prints per run: transfers/s, fairness (the slowest process's transfers over
the fastest's), the worst time one transfer took, errors, the money created
or destroyed, and the accounts whose balance differs from their ledger; then
the medians and mpwriter's ratio to ``immediate``. A benchmark: it reports,
never gates.

    python tools/bench_orm_transfers.py [--processes 8,16] [--sync NORMAL,FULL]
                                        [--seconds 4] [--runs 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import statistics
import tempfile
import time
from typing import Any

from sqlalchemy import Engine, ForeignKey, create_engine, event
from sqlalchemy.dialects import registry
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import mpwriter

registry.register("sqlite.mpwriter", "mpwriter.sqlalchemy", "MPWriterDialect")

ACCOUNTS = 50
OPENING = 1000


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    balance: Mapped[int]


class Ledger(Base):
    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    delta: Mapped[int]


def make_engine(mode: str, url: str, synchronous: str) -> Engine:
    """The engine of ``mode``, each connection set to ``synchronous``."""
    if mode == "mpwriter":
        return create_engine(url)  # the writer's own setting applies
    engine = create_engine(url, connect_args={"timeout": 5})

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute(f"PRAGMA synchronous={synchronous}")
        if mode == "immediate":
            dbapi_connection.isolation_level = None  # the recipe: pysqlite's BEGIN off

    if mode == "immediate":

        @event.listens_for(engine, "begin")
        def on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def transfers(
    mode: str, url: str, synchronous: str, seconds: float, seed: int
) -> tuple[int, int, float]:
    """One process's loop: (transfers done, errors, the worst seconds one took)."""
    engine = make_engine(mode, url, synchronous)
    rng = random.Random(seed)
    done = errors = 0
    worst = 0.0
    deadline = time.monotonic() + seconds
    while (began := time.monotonic()) < deadline:
        a, b = rng.sample(range(1, ACCOUNTS + 1), 2)
        amount = rng.randint(1, 50)
        try:
            with Session(engine) as session, session.begin():
                source = session.get(Account, a)
                target = session.get(Account, b)
                if source is None or target is None:
                    raise LookupError("account missing")
                source.balance -= amount
                target.balance += amount
                session.add(Ledger(account_id=a, delta=-amount))
                session.add(Ledger(account_id=b, delta=amount))
            done += 1
        except Exception:  # counted and reported
            errors += 1
        worst = max(worst, time.monotonic() - began)
    engine.dispose()
    return done, errors, worst


def run(
    mode: str, directory: str, processes: int, synchronous: str, seconds: float
) -> dict[str, Any]:
    """One timed run on a fresh database; its figures."""
    path = os.path.join(directory, f"{mode}-{processes}-{synchronous}-{time.monotonic_ns()}.db")
    writer = None
    if mode == "mpwriter":
        writer = mpwriter.start(path, context="fork", synchronous=synchronous)
        mpwriter.attach(writer)
        url = f"sqlite+mpwriter:///{path}"
    else:
        url = f"sqlite:///{path}"
    try:
        engine = make_engine(mode, url, synchronous)
        Base.metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            session.add_all(Account(id=i, balance=OPENING) for i in range(1, ACCOUNTS + 1))
        engine.dispose()
        initargs = (writer,) if writer is not None else ()
        initializer = mpwriter.attach if writer is not None else None
        context = multiprocessing.get_context("fork")
        with context.Pool(processes, initializer=initializer, initargs=initargs) as pool:
            outcomes = pool.starmap_async(
                transfers,
                [(mode, url, synchronous, seconds, seed) for seed in range(processes)],
            ).get(timeout=seconds + 120)
    finally:
        if writer is not None:
            writer.close()
    with mpwriter.reader(path) as conn:
        total = conn.execute("SELECT sum(balance) FROM accounts").fetchone()[0]
        off = conn.execute(
            "SELECT count(*) FROM (SELECT a.id FROM accounts a "
            "LEFT JOIN ledger l ON l.account_id = a.id GROUP BY a.id "
            f"HAVING a.balance != {OPENING} + coalesce(sum(l.delta), 0))"
        ).fetchone()[0]
    counts = [d for d, _, _ in outcomes]
    return {
        "rate": sum(counts) / seconds,
        "fairness": min(counts) / max(counts) if max(counts) else 0.0,
        "worst_ms": 1000 * max(w for _, _, w in outcomes),
        "errors": sum(e for _, e, _ in outcomes),
        "drift": total - ACCOUNTS * OPENING,
        "off": off,
    }


MODES = ("stock", "immediate", "mpwriter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", default="8,16")
    parser.add_argument("--sync", default="NORMAL,FULL")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    syncs = [s.strip().upper() for s in args.sync.split(",")]
    print(f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{args.runs} runs of {args.seconds} s per configuration, modes interleaved")
    results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        for _round in range(args.runs):
            for synchronous in syncs:
                for processes in counts:
                    for mode in MODES:
                        figures = run(mode, directory, processes, synchronous, args.seconds)
                        results.setdefault((mode, processes, synchronous), []).append(figures)
                        print(
                            f"{mode:10} {processes:3d} processes {synchronous:6}"
                            f" {figures['rate']:7.0f}/s fairness {figures['fairness']:.2f}"
                            f" worst {figures['worst_ms']:7.0f} ms errors {figures['errors']:4d}"
                            f" drift {figures['drift']:+6d} off {figures['off']}/{ACCOUNTS}",
                            flush=True,
                        )
    print("\nmedians")
    for synchronous in syncs:
        for processes in counts:
            median = {
                mode: {
                    key: statistics.median(r[key] for r in results[(mode, processes, synchronous)])
                    for key in ("rate", "fairness", "worst_ms")
                }
                for mode in MODES
            }
            ratio = median["mpwriter"]["rate"] / max(median["immediate"]["rate"], 1e-9)
            print(
                f"{synchronous:6} {processes:3d} processes: "
                + "  ".join(
                    f"{mode} {m['rate']:.0f}/s fair {m['fairness']:.2f}"
                    f" worst {m['worst_ms']:.0f} ms"
                    for mode, m in median.items()
                )
                + f"  mpwriter/immediate {ratio:.2f}x"
            )


if __name__ == "__main__":
    main()
