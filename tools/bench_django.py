"""Django under gunicorn beside a manage.py loop: the stock SQLite backend against mpwriter.django.

The workload of tests/test_django.py, longer: a gunicorn master with 4 sync
workers serving 8 client threads that post bank transfers (``atomic()``: two
``F()`` updates and two ledger rows) and ``F()`` increments, beside a separate
process running ``manage.py transfer_loop`` (the same transfer and increment,
in a loop). Three backends: the stock SQLite backend with
``transaction_mode="IMMEDIATE"`` and ``timeout=5`` (what Django 5.1+ advises
against "database is locked"), and mpwriter.django with synchronous NORMAL
and FULL. Prints, per backend: web requests/s, loop operations/s, fairness
(the smaller side's operations over the larger's), the worst wait of each
side, the errors, and whether money was conserved and balances equal their
ledgers. A benchmark: it reports, never gates.

    python tools/bench_django.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sqlite3
import sys
import tempfile
from pathlib import Path

import mpwriter
import mpwriter.django

# The project and its workload are the tests' (tests/_django_project.py).
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)
from _django_project import gunicorn, in_child, prepare_bank, workload, write_project

BACKENDS = {
    "stock IMMEDIATE": ("django.db.backends.sqlite3", None),
    "mpwriter NORMAL": ("mpwriter.django", "NORMAL"),
    "mpwriter FULL": ("mpwriter.django", "FULL"),
}


def consistent(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        total, accounts = conn.execute("SELECT sum(balance), count(*) FROM shop_account").fetchone()
        drift = conn.execute(
            "SELECT count(*) FROM shop_account a LEFT JOIN (SELECT account_id, sum(delta) AS d"
            " FROM shop_ledger GROUP BY account_id) l ON l.account_id = a.id"
            " WHERE a.balance != 1000 + coalesce(l.d, 0)"
        ).fetchone()[0]
    money = "conserved" if total == 1000 * accounts else "NOT conserved"
    return f"money {money}, {drift} ledger drift"


def run(name: str, seconds: float) -> None:
    engine, synchronous = BACKENDS[name]
    with tempfile.TemporaryDirectory() as directory:
        options = {"transaction_mode": "IMMEDIATE", "timeout": 5} if synchronous is None else {}
        project = write_project(Path(directory), engine, options)
        handle = None
        if synchronous is not None:
            handle = mpwriter.start(
                project / "app.db", init=mpwriter.django.writer_init, synchronous=synchronous
            )
        try:
            in_child(project, handle, prepare_bank)
            with gunicorn(project, handle) as port:
                got = workload(project, handle, port, seconds)
        finally:
            if handle is not None:
                handle.close()
        web = got.web_transfers + got.web_increments
        loop = got.loop_transfers + got.loop_increments
        fairness = min(web, loop) / max(web, loop, 1)
        print(
            f"{name:16} web {web / seconds:7.1f} req/s (worst {got.web_worst:6.3f} s,"
            f" {got.web_errors} errors)  loop {loop / seconds:7.1f} op/s"
            f" (worst {got.loop_worst:6.3f} s, {got.loop_errors} errors)"
            f"  fairness {fairness:.2f}  total transfers"
            f" {(got.web_transfers + got.loop_transfers) / seconds:7.1f}/s"
            f"  {consistent(project / 'app.db')}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--backend", choices=sorted(BACKENDS), action="append")
    args = parser.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}")
    for name in args.backend or BACKENDS:
        run(name, args.seconds)


if __name__ == "__main__":
    main()
