"""ORM bank transfers from several processes: stock sqlite:// against sqlite+mpwriter://.

Each process loops for the given seconds: ``Session.begin()``, read both
balances, update both, add two ledger rows. Prints, per engine, the transfers
done, their rate, the errors, the money created or destroyed, and the accounts
whose balance differs from their ledger. A benchmark: it reports, never gates.

    python tools/bench_orm_transfers.py [--processes 8] [--seconds 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import tempfile
import time

from sqlalchemy import ForeignKey, create_engine, text
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


def transfers(url: str, seconds: float, seed: int) -> tuple[int, int]:
    engine = create_engine(url)
    rng = random.Random(seed)
    done = errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
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
    engine.dispose()
    return done, errors


def run(url: str, path: str, processes: int, seconds: float, writer: object) -> None:
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all(Account(id=i, balance=OPENING) for i in range(1, ACCOUNTS + 1))
    initargs = (writer,) if writer is not None else ()
    initializer = mpwriter.attach if writer is not None else None
    context = multiprocessing.get_context("fork")
    with context.Pool(processes, initializer=initializer, initargs=initargs) as pool:
        outcomes = pool.starmap_async(
            transfers, [(url, seconds, seed) for seed in range(processes)]
        ).get(timeout=seconds + 120)
    done = sum(d for d, _ in outcomes)
    errors = sum(e for _, e in outcomes)
    with engine.connect() as conn:
        total = conn.execute(text("SELECT sum(balance) FROM accounts")).scalar()
        off = conn.execute(
            text(
                "SELECT count(*) FROM (SELECT a.id FROM accounts a "
                "LEFT JOIN ledger l ON l.account_id = a.id GROUP BY a.id "
                f"HAVING a.balance != {OPENING} + coalesce(sum(l.delta), 0))"
            )
        ).scalar()
    engine.dispose()
    print(
        f"{url.split(':')[0]:16} {done:7d} transfers {done / seconds:8.0f}/s "
        f"errors {errors:5d}  money drift {total - ACCOUNTS * OPENING:+6d}  "
        f"accounts off their ledger {off}/{ACCOUNTS}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    print(f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{args.processes} processes, {args.seconds} s each")
    with tempfile.TemporaryDirectory() as directory:
        stock = os.path.join(directory, "stock.db")
        run(f"sqlite:///{stock}", stock, args.processes, args.seconds, None)
        ours = os.path.join(directory, "ours.db")
        writer = mpwriter.start(ours, context="fork")
        mpwriter.attach(writer)
        try:
            run(f"sqlite+mpwriter:///{ours}", ours, args.processes, args.seconds, writer)
        finally:
            writer.close()


if __name__ == "__main__":
    main()
