"""mpwriter: one writer process for SQLite, shared by every process of your app.

    writer = mpwriter.start("app.db")
    writer.execute("INSERT INTO t(x) VALUES (?)", (1,))   # returns once committed

The guarantees and the limits: the documentation's guarantees page (docs/guarantees.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._caller.attached import attach, get_writer
from ._caller.connect import connect
from ._caller.handle import Transaction, Writer
from ._caller.session import Session
from ._errors import (
    AccessDenied,
    DatabaseError,
    Error,
    IntegrityError,
    Interrupted,
    MigrationFailed,
    MissingDependency,
    MissingMainGuard,
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
    UntrustedFile,
    WriterAlreadyRunning,
    WriterClosed,
    WriterCrashed,
    WriterUnavailable,
)
from ._wire.replies import Result
from ._wire.stats import Stats
from .prometheus import prometheus_text
from .sql import native

if TYPE_CHECKING:
    from ._caller.reader import ReadConnection, reader
    from ._owner.either import start_or_connect
    from ._owner.owner import start

__all__ = [
    "AccessDenied",
    "DatabaseError",
    "Error",
    "IntegrityError",
    "Interrupted",
    "MigrationFailed",
    "MissingDependency",
    "MissingMainGuard",
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
    "UntrustedFile",
    "Writer",
    "WriterAlreadyRunning",
    "WriterClosed",
    "WriterCrashed",
    "WriterUnavailable",
    "attach",
    "connect",
    "get_writer",
    "native",
    "prometheus_text",
    "reader",
    "start",
    "start_or_connect",
]

__version__ = "0.1.0"

# Loaded on first use, so that importing mpwriter loads the caller side only:
# `start` brings the owner and the writer side (the SQLite engine),
# `reader` brings sqlite3, which a process that only calls a writer -- or
# only uses PostgreSQL -- does not need.
_LAZY = {
    "start": "._owner.owner",
    "start_or_connect": "._owner.either",
    "reader": "._caller.reader",
    "ReadConnection": "._caller.reader",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next lookup finds it without this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
