"""The exception tree: everything mpwriter raises of its own derives from `Error`.

SQL errors are not wrapped: they reach the caller as the original `sqlite3`
class, with the writer-side traceback attached as ``__cause__`` (a
`RemoteTraceback`), the way `concurrent.futures` reports a worker's error.

Every class here is picklable with its message intact: they cross process
boundaries (a pool task may re-raise one in its parent).
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every exception raised by mpwriter itself."""


class WriterUnavailable(Error):
    """The writer cannot serve this call: it was closed, or it died.

    The message says which, and whether the request may have been applied
    ("outcome unknown") or certainly was not.
    """


class WriterClosed(WriterUnavailable):
    """The writer was closed on purpose (`Writer.close()` or SIGTERM)."""


class WriterCrashed(WriterUnavailable):
    """The writer process ended without being asked to."""


class WriterAlreadyRunning(Error):
    """Another mpwriter writer holds the lock file of this database."""


class Timeout(Error, TimeoutError):
    """No reply arrived within the call's timeout; the outcome is unknown.

    The request may still be applied later by the writer, or may already have
    been: treat the write as "maybe done".
    """


class QueueFull(Error):
    """Backpressure: the request queue stayed full for the whole timeout.

    Nothing was sent; the request was certainly not applied.
    """


class Interrupted(Error):
    """The writer interrupted this request at its execution limit.

    Long SQL is stopped by SQLite's progress handler and a long `call()`
    function by the writer's limiter thread; either way the request's changes are
    rolled back (nothing of it was applied) and the writer serves on.
    """


class StatementRefused(Error):
    """The writer refused a statement that would end or split its transaction.

    BEGIN, COMMIT, END, ROLLBACK, SAVEPOINT and RELEASE are the writer's to
    issue: every request already runs atomically inside its own savepoint.
    Nothing of the refused request was applied.
    """


class NotPicklable(Error, TypeError):
    """An argument (or a `call()` result) could not be pickled.

    Raised in the caller before anything was queued when an argument fails;
    raised from the writer (with its changes rolled back) when a result fails.
    """


class RemoteError(Error):
    """An exception from the writer side that could not itself be pickled.

    The message carries the original type name and text.
    """


class RemoteTraceback(Exception):
    """Carries the writer-side traceback text; set as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
