"""Durability: an acknowledged write survives a SIGKILL of the writer, and of the whole tree.

A call returns only after the COMMIT that made its write durable; with
``synchronous=NORMAL`` in WAL mode that commit survives a crash of any process
(FULL adds power loss, which a test cannot stage). The tests run the routines
of tests/kill_writer.py and tests/kill_tree.py (the faults), whose clients and
audit live in tests/_faults.py, and assert what the issue asks:

- every row whose call returned is in the database, and ``PRAGMA
  integrity_check`` is ok;
- a row without an acknowledgement belongs to a call told "the outcome is
  unknown" (or, after a tree kill, to the call in flight), never to one told
  "not sent";
- under writer kills, every call ends within its timeout plus a second, with
  `mpwriter.WriterCrashed` if it does not return (never `Timeout`: a writer
  that had served is replaced at once), and the writer is restarted after
  every kill, with mpwriter's default restart settings.

Nothing here sleeps: the routine waits on the clients' pipes and on pidfds,
each wait with a deadline, and reaps every child with escalation.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import kill_tree
import kill_writer

WRITER_KILLS = 20  # with mpwriter's default restart settings: each writer killed had served
CALL_TIMEOUT = 5.0
TREE_ROUNDS = 5


def test_writer_sigkills_under_load_lose_no_acknowledged_row(db_path: Path) -> None:
    children_before = set(multiprocessing.active_children())  # other tests' not yet reaped
    report = kill_writer.run(
        db_path,
        kills=WRITER_KILLS,
        clients=4,
        call_timeout=CALL_TIMEOUT,
    )
    seed = f"(seed {report.seed})"
    assert report.failures == [], seed
    assert report.kills == WRITER_KILLS
    assert report.restarts == WRITER_KILLS, seed
    assert report.acknowledged > WRITER_KILLS, seed  # writes went through after every kill

    audit = report.audit
    assert audit is not None
    assert audit.integrity == "ok", seed
    assert audit.lost == [], f"acknowledged rows lost {seed}"
    assert audit.contradicted == [], seed
    assert audit.unexplained == [], seed
    assert audit.rows == report.acknowledged + audit.unacknowledged

    # A kill may cost a call its answer, never its bounded wait.
    assert report.unexpected_errors == [], seed
    # A writer that served is replaced at once: no call waits out its timeout.
    assert set(report.errors_by_class) <= {"WriterCrashed"}, report.errors_by_class
    assert report.overruns == [], seed
    assert report.max_call <= CALL_TIMEOUT + kill_writer.OVERRUN_MARGIN
    assert set(multiprocessing.active_children()) - children_before == set()


def test_killing_the_whole_tree_loses_no_acknowledged_row(db_path: Path) -> None:
    children_before = set(multiprocessing.active_children())  # other tests' not yet reaped
    report = kill_tree.run_tree(db_path, rounds=TREE_ROUNDS, clients=4, call_timeout=CALL_TIMEOUT)
    seed = f"(seed {report.seed})"
    assert report.failures == [], seed
    assert len(report.rounds) == TREE_ROUNDS
    for number, one in enumerate(report.rounds):
        where = f"round {number} {seed}"
        assert one.after_acks > 0, where  # killed under load, not before it
        assert one.audit.integrity == "ok", where
        assert one.audit.lost == [], f"acknowledged rows lost in {where}"
        assert one.audit.contradicted == [], where
        assert one.audit.unexplained == [], where
    # Nothing died before the kill: no call may have failed.
    assert report.errors_by_class == {}, report.unexpected_errors
    assert report.overruns == [], seed
    assert set(multiprocessing.active_children()) - children_before == set()
