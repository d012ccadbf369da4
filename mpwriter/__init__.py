"""mpwriter: one writer process for SQLite, shared by every process of your app.

    writer = mpwriter.start("app.db")
    writer.execute("INSERT INTO t(x) VALUES (?)", (1,))   # returns once committed

See README.md for the guarantees and the limits.
"""

from ._caller.attached import attach, get_writer
from ._caller.handle import Transaction, Writer
from ._caller.reader import ReadConnection, reader
from ._caller.session import Session
from ._errors import (
    DatabaseError,
    Error,
    IntegrityError,
    Interrupted,
    NotPicklable,
    NotSupportedError,
    OperationalError,
    OutcomeUnknown,
    ProgrammingError,
    QueueFull,
    RemoteError,
    RemoteTraceback,
    ServerUnavailable,
    SessionExpired,
    StatementRefused,
    Timeout,
    WriterAlreadyRunning,
    WriterClosed,
    WriterCrashed,
    WriterUnavailable,
)
from ._owner.owner import start
from ._wire.replies import Result
from ._wire.stats import Stats
from ._writer.metrics import prometheus_text
from ._writer.pg_sql import native

__all__ = [
    "DatabaseError",
    "Error",
    "IntegrityError",
    "Interrupted",
    "NotPicklable",
    "NotSupportedError",
    "OperationalError",
    "OutcomeUnknown",
    "ProgrammingError",
    "QueueFull",
    "ReadConnection",
    "RemoteError",
    "RemoteTraceback",
    "Result",
    "ServerUnavailable",
    "Session",
    "SessionExpired",
    "StatementRefused",
    "Stats",
    "Timeout",
    "Transaction",
    "Writer",
    "WriterAlreadyRunning",
    "WriterClosed",
    "WriterCrashed",
    "WriterUnavailable",
    "attach",
    "get_writer",
    "native",
    "prometheus_text",
    "reader",
    "start",
]

__version__ = "0.1.0"
