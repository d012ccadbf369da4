"""The seam between the group-commit loop and a database engine.

The loop (`loop.py`) takes requests from the inbox (`inbox.py`), forms
batches, hands their replies to the outbox (`outbox.py`), answers STATS and
shuts down; it knows nothing of SQL. An engine owns everything that
is its database's: claiming the right to write (SQLite's lock file), opening
the one connection after the writer process has started, running a batch as
one transaction with each request isolated from the others, the busy/retry
signal, interrupting a request at its deadline, upkeep between batches
(SQLite's WAL checkpoint) and closing. Engines differ most in how a batch
runs -- SQLite executes one statement at a time in-process, a network server
wants the whole batch pipelined -- so the unit of the interface is the batch,
not the statement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .. import testing
from .._errors import MissingDependency, carry_cause
from .._wire.address import is_server_url
from .._wire.frames import Request
from .batch import Counters, Work
from .sqlite import open_sqlite_engine


class Engine(Protocol):
    """What the loop needs of a database."""

    # What a COMMIT has cost lately, in seconds (`batch.commit_cost`): the
    # loop lets a batch wait up to that long for callers about to send, so
    # that they share its commit. 0 for an engine whose commits cost nothing.
    commit_seconds: float

    def run(self, batch: list[Work]) -> list[tuple[Request, bytes]]:
        """Run ``batch`` as one transaction; return each request's encoded reply.

        Returns only once the transaction has committed (or failed): every OK
        reply it returns is durable. One request's failure is answered with
        its own error and never touches another request's reply. Raises only
        when the engine's own statements fail; the loop then fails the whole
        batch and calls `abandon_transaction`.

        A request that cannot run inside a transaction (SQLite's VACUUM) may
        be left out of the replies: it is deferred to `run_alone`. A request
        that neither this nor `run_alone` answers (PostgreSQL: one that waits
        on a lock held outside the writer) is served again in a later batch.
        """
        ...

    def run_alone(self) -> Iterable[tuple[Request, bytes]]:
        """Run the requests the last `run` deferred, each alone; yield each reply.

        The loop sends the batch's replies first and each of these as it comes,
        so that no statement run alone holds back another request's reply. An
        engine that defers nothing returns an empty iterable.
        """
        ...

    def abandon_transaction(self) -> None:
        """Roll back whatever transaction is open (after a failed `run`)."""
        ...

    def tidy(self, idle: bool) -> None:
        """Do deferred upkeep (SQLite: a WAL checkpoint) between batches.

        The loop calls it once after each batch's replies were sent, so that
        no commit and no reply waits on upkeep; ``idle`` is True when no
        request is left in hand or queued (nobody waits on it at all). An
        engine that needs no upkeep does nothing. Never raises: failures are
        logged.
        """
        ...

    def close(self) -> None:
        """Roll back, tidy up (checkpoint), close the connection, release any claim.

        Called once, when the loop has returned or failed; logs its own failures.
        """
        ...


@dataclass(frozen=True)
class WriterConfig:
    """Everything the writer process needs to open its engine; picklable."""

    path: str
    synchronous: str
    init: str | Callable[[Any], object] | None
    max_batch: int
    execution_limit: float | None = None
    slow_request: float | None = 1.0
    # The request stream's frame key (`mpwriter._wire.frames.new_frame_key`),
    # made by the owner and known to its callers; 0 is the unkeyed stream.
    frame_key: int = 0
    isolation: str = "read committed"  # PostgreSQL only
    # Applied once each, in order, after init (`migrations.py`).
    migrations: tuple[str | Callable[[Any], object], ...] = ()
    # The most a session may last, idle or in all, whatever its caller asks:
    # the writer holds every other request while one is open.
    max_session_seconds: float = 60.0


def open_engine(config: WriterConfig, counters: Counters, state: Any) -> Engine:
    """Open the engine that serves ``config.path``, in the writer process.

    Raises `WriterAlreadyRunning` if another writer holds the database, or
    the error that opening the database raised.
    """
    if testing.faults.engine is not None:
        engine: Engine = testing.faults.engine(counters)
        return engine
    if is_server_url(config.path):
        # Imported here: psycopg is an optional dependency (mpwriter[postgres]).
        try:
            from .postgres import open_postgres_engine
        except ImportError as exc:
            missing = MissingDependency(
                f"a PostgreSQL URL needs psycopg, which could not be imported ({exc}):"
                " pip install 'mpwriter[postgres]'"
            )
            raise carry_cause(missing, exc) from exc

        return open_postgres_engine(
            config.path,
            config.init,
            counters,
            state,
            config.isolation,
            config.execution_limit,
            config.migrations,
        )
    return open_sqlite_engine(
        config.path,
        config.synchronous,
        config.init,
        counters,
        state,
        config.execution_limit,
        config.migrations,
    )
