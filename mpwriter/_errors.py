"""The exception tree: everything mpwriter raises of its own derives from `Error`.

SQL errors are not wrapped: they reach the caller as the original `sqlite3`
or psycopg class, with the writer-side traceback attached as ``__cause__`` (a
`RemoteTraceback`), the way `concurrent.futures` reports a worker's error.
Their class also derives from `DatabaseError` and its kin below (see
`portable`), so one ``except mpwriter.IntegrityError`` serves both engines.

Every class here is picklable with its message intact: they cross process
boundaries (a pool task may re-raise one in its parent).
"""

from __future__ import annotations

from typing import Any


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


class AccessDenied(Error, PermissionError):
    """This process may not use the writer: its endpoint refused it (`mpwriter.connect`).

    Only the writer's own user, and the group given to ``start(allow_group=)``,
    may connect. Nothing was sent.
    """


class WriterAlreadyRunning(Error):
    """Another mpwriter writer serves this database file, under this name or another.

    For a PostgreSQL writer (no file to lock): another writer of this user
    answers at the endpoint given to `start()`; that one is also an `OSError`.
    """


class UntrustedFile(Error, PermissionError):
    """A file mpwriter keeps beside the database is not safely this user's own.

    Raised by `start()` when the lock file is a symlink, not a regular file,
    or owned by another user (who could hold its lock or change it), or when
    another user's file stands at the endpoint and this user may not replace
    it (a sticky directory). Nothing was started; the message names the file.

    Raised by `connect()` (and a connected handle's next call, which dials
    again) when the process answering at the endpoint, or its socket file,
    is not of a user it trusts (see `connect`): whoever answers there would
    receive the requests and send the replies this process unpickles.
    Nothing was sent; the message says who answered.
    """


class MissingMainGuard(Error, RuntimeError):
    """`start()` was called while a child process re-ran the main module.

    Under the "spawn" and "forkserver" start methods a child process (or the
    fork server) imports the program's main module again, as ``__mp_main__``,
    and runs its top level. A `start()` there would start a second writer for
    the same database. The fix: start the writer under
    ``if __name__ == "__main__":``. Nothing was started.
    """


class MigrationFailed(Error):
    """A migration given to `start()` failed: the writer did not start.

    The message names the migration (its number and first line) and the
    error. Nothing of the failed migration was applied; the migrations
    before it stay applied and recorded.
    """


class Timeout(Error, TimeoutError):
    """No reply arrived within the call's timeout; the outcome is unknown.

    The request may still be applied later by the writer, or may already have
    been: treat the write as "maybe done".
    """


class QueueFull(Error):
    """Backpressure: the request could not be queued; it was certainly not applied.

    The request queue stayed full for the whole timeout (nothing was sent),
    or the writer dropped a bulk request's payload because the payloads
    waiting to be served passed its bound (the message says which).
    """


class Interrupted(Error):
    """The writer interrupted this request at its deadline or its execution limit.

    Long SQL is stopped by SQLite's progress handler and a long `call()`
    function by the writer's limiter thread; either way the request's changes are
    rolled back (nothing of it was applied) and the writer serves on.
    """


class StatementRefused(Error):
    """The writer refused a statement that would end or split its transaction.

    On PostgreSQL also one that would change the writer's session for later
    requests (SET without LOCAL, RESET, DISCARD, LISTEN, ...).

    BEGIN, COMMIT, END, ROLLBACK, SAVEPOINT and RELEASE are the writer's to
    issue: every request already runs atomically inside its own savepoint.
    Nothing of the refused request was applied.
    """


class NotPicklable(Error, TypeError):
    """An argument (or a `call()` result) could not be pickled.

    Raised in the caller before anything was queued when an argument fails;
    raised from the writer (with its changes rolled back) when a result fails.
    """


class MissingDependency(Error, ImportError):
    """An optional dependency is not installed (psycopg, for a PostgreSQL URL).

    The message names what to install (``pip install 'mpwriter[postgres]'``);
    the import error is its ``__cause__``. Also an `ImportError`.
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


class ServerUnavailable(Error):
    """The writer could not reach the database server (PostgreSQL) for this request.

    The request was certainly not applied: it was rolled back, or never sent.
    The writer reconnects with backoff; a later call may succeed.
    """


class OutcomeUnknown(ServerUnavailable):
    """The connection to the server was lost after COMMIT was sent, before its answer.

    The transaction may or may not have committed: treat the write as "maybe
    done", as after a `Timeout`.
    """


def carry_cause(error: Error, cause: BaseException) -> Error:
    """``error`` with ``cause`` as its ``__cause__``, kept across pickling.

    Pickling drops ``__cause__``; an error the writer raises while starting
    crosses to the owner, where `start_failure` sets it again.
    """
    error.__cause__ = cause
    error.__dict__["_mpwriter_cause"] = cause
    return error


def start_failure(exc: BaseException) -> BaseException:
    """What `start()` raises for ``exc``, which the writer raised while starting.

    ``__cause__`` set again if `carry_cause` kept it; a driver's error
    (``init`` failing) as its `portable` class, an mpwriter `DatabaseError`.
    """
    cause = vars(exc).pop("_mpwriter_cause", None) if hasattr(exc, "__dict__") else None
    if cause is not None:
        exc.__cause__ = cause
    return portable(exc)


# -- one except clause for both engines ----------------------------------------
#
# ``except mpwriter.IntegrityError`` must catch SQLite's and PostgreSQL's
# constraint violations alike. An ``except`` clause checks real subclassing
# only (a class registered with an ABC is not caught), so an SQL error that
# reaches the caller is given a class that derives from both: its own
# (``sqlite3.IntegrityError``, ``psycopg.errors.UniqueViolation``) first, then
# the mpwriter class below. ``except sqlite3.IntegrityError``, ``.sqlstate``
# and the message keep working; the class keeps its original name.


class DatabaseError(Error):
    """An SQL error from either engine (sqlite3.DatabaseError, psycopg.DatabaseError)."""


class IntegrityError(DatabaseError):
    """A constraint violation on either engine (UNIQUE, FOREIGN KEY, NOT NULL, CHECK)."""


class OperationalError(DatabaseError):
    """An operational SQL error on either engine (a lock, a missing table on SQLite, ...)."""


class ProgrammingError(DatabaseError):
    """A programming error on either engine (wrong number of parameters, ...)."""


class NotSupportedError(DatabaseError):
    """Not supported by the engine or the interface (PEP 249): e.g. sessions on PostgreSQL."""


class SessionExpired(OperationalError):
    """The writer rolled an interactive session's transaction back on its own.

    Past its idle limit between statements or its total limit, when its
    caller's reply pipe was closed, when the writer was closing, or when
    SQLite abandoned the transaction that held it: nothing of that
    transaction was applied. The session itself may be used again: the next
    statement opens a new transaction.
    """


# The rest of PEP 249's tree, public as mpwriter.dbapi's attributes.


class InterfaceError(Error):
    """An error of the database interface rather than the database (PEP 249)."""


class DataError(DatabaseError):
    """A problem with the processed data: a value out of range, ... (PEP 249)."""


class InternalError(DatabaseError):
    """The database's internal error (PEP 249)."""


class Warning(Exception):
    """An important warning (PEP 249); mpwriter raises none of its own."""


# The DB-API class names that map onto the classes above, looked up along the
# error's MRO so that the most specific one wins (sqlite3.DataError -> DataError).
_PORTABLE_NAMES: dict[str, type[Error]] = {
    "IntegrityError": IntegrityError,
    "OperationalError": OperationalError,
    "ProgrammingError": ProgrammingError,
    "DataError": DataError,
    "InternalError": InternalError,
    "NotSupportedError": NotSupportedError,
    "DatabaseError": DatabaseError,
    "InterfaceError": InterfaceError,
}
_DRIVER_MODULES = frozenset({"sqlite3", "psycopg"})
_dual_classes: dict[type[BaseException], type[BaseException]] = {}


def portable(exc: BaseException) -> BaseException:
    """``exc`` as an instance of a class that is also an mpwriter `DatabaseError`.

    Returns ``exc`` itself when it is no driver error (or already portable).
    The copy has the same args and attributes (``sqlite_errorcode``,
    psycopg's diagnostics) and pickles as itself.
    """
    if isinstance(exc, Error):
        return exc
    dual = _dual_class(type(exc))
    if dual is None:
        return exc
    return _rebuild_portable(type(exc), exc.args, vars(exc))


def _dual_class(base: type[BaseException]) -> type[BaseException] | None:
    dual = _dual_classes.get(base)
    if dual is not None:
        return dual
    ours = next(
        (
            _PORTABLE_NAMES[cls.__name__]
            for cls in base.__mro__
            if cls.__module__ in _DRIVER_MODULES and cls.__name__ in _PORTABLE_NAMES
        ),
        None,
    )
    if ours is None:
        return None
    namespace = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "__reduce__": _reduce_portable,
    }
    dual = type(base.__name__, (base, ours), namespace)
    _dual_classes[base] = dual
    return dual


def _reduce_portable(self: BaseException) -> tuple[Any, ...]:
    # Pickled by its driver class: the dual class is rebuilt on arrival.
    base = type(self).__mro__[1]
    return (_rebuild_portable, (base, self.args, dict(vars(self))))


def _rebuild_portable(
    base: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]
) -> BaseException:
    dual = _dual_class(base)
    cls = base if dual is None else dual
    # BaseException.__new__ stores args; the driver's own __init__ (psycopg's
    # takes keyword-only diagnostics) is bypassed and its state copied instead.
    copy = cls.__new__(cls, *args)
    copy.__dict__.update(state)
    return copy
