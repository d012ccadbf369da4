"""Stopping a `call()` function at its stop time, whatever the function does.

The writer runs a caller's Python function inside its transaction; the
function's deadline (or the writer's ``execution_limit``) must hold even if
the function installs its own signal handlers, cancels timers, catches the
exception meant to stop it, or blocks in a system call. `CallLimiter` is a
thread of the writer that enforces it from outside the function; code that
never returns to the interpreter is left to the supervisor's watchdog.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found,unused-ignore]  # no stub
import ctypes
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from .._errors import RemoteError
from .forks import leave_if_forked

T = TypeVar("T")

# The signal `CallLimiter` sends the writer's thread to break a blocking
# system call (sleep, select, read): one whose default action is to do
# nothing, so that a function that resets it cannot get the writer killed.
KICK_SIGNAL = signal.SIGURG
# How often `CallLimiter` interrupts again a function that caught the
# interruption and kept running.
REFIRE_INTERVAL = 0.05


class CallOverrun(BaseException):
    """Raised inside a `call()` function that ran past its stop time.

    A BaseException, so that the function's own ``except Exception`` does not
    swallow it; a function that swallows it anyway is still answered
    `Interrupted` (see `CallLimiter.fired`).
    """


def not_an_exception(exc: BaseException) -> RemoteError:
    """What a caller gets for a `BaseException` that is no `Exception`
    (SystemExit, KeyboardInterrupt, GeneratorExit, a framework's own) raised
    by its call() function: the request is rolled back; the writer serves on."""
    return RemoteError(
        f"the call() function raised {type(exc).__qualname__}: {exc};"
        " rolled back, not applied (the writer serves on)"
    )


# signal.getsignal and signal.pthread_sigmask wrap these C functions to turn
# their ints into enums: for a Python handler getsignal raises and catches a
# ValueError inside Enum to find out it is not one, tens of times slower than
# these. `restore_signals` runs them after every call().
_raw_getsignal: Callable[[int], object] = _signal.getsignal
_raw_sigmask: Callable[[int, Iterable[int]], set[int]] = _signal.pthread_sigmask


def own_signals() -> frozenset[int]:
    """Set the writer's own handlers; return the signal mask `restore_signals` keeps.

    Run once, in the writer's thread, by an engine that runs call()
    functions. The writer itself uses no SIGALRM: a call() may, within the
    call; ignored otherwise, so that a timer a function left behind is
    harmless. `KICK_SIGNAL` gets a handler that does nothing, so that it
    breaks a blocking system call (with SIG_IGN it would not).
    """
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.signal(KICK_SIGNAL, ignore_kick)
    return frozenset(_raw_sigmask(signal.SIG_BLOCK, ()))


def restore_signals(mask: frozenset[int]) -> None:
    """Put back the signal handling a call() function may have changed.

    Cheap enough to run after every call(): SIGALRM ignored again, no timer
    left to fire in a later request, `KICK_SIGNAL`'s handler, and ``mask``
    (from `own_signals`) as the thread's signal mask.
    """
    # The raw getsignal gives SIG_IGN as the plain int; an exact int, so
    # that a handler object with an __eq__ of its own cannot pass for it.
    alarm_handler = _raw_getsignal(signal.SIGALRM)
    if type(alarm_handler) is not int or alarm_handler != signal.SIG_IGN:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
    # (No cheaper test for a timer: reading it is a system call as well.)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if _raw_getsignal(KICK_SIGNAL) is not ignore_kick:
        signal.signal(KICK_SIGNAL, ignore_kick)
    _raw_sigmask(signal.SIG_SETMASK, mask)


# PyThreadState_SetAsyncExc: raise an exception in another thread at its next
# bytecode. Two prototypes: one to set an exception class, one to pass NULL,
# which clears a pending one.
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


class CallLimiter:
    """Stops a `call()` function at its stop time, whatever the function does.

    The old mechanism -- SIGALRM and the process timer -- belonged to the
    function as much as to the writer: a function that installed its own
    SIGALRM handler, or called ``alarm()``, switched the limit off for the
    writer's lifetime. This thread needs neither. Past the stop time it
    interrupts the database (``interrupt``: SQLite's
    `sqlite3.Connection.interrupt`; PostgreSQL needs none, its
    ``statement_timeout`` stops the SQL), raises `CallOverrun`
    in the writer's thread at its next bytecode, and sends it `KICK_SIGNAL`
    to break a blocking system call; and again every `REFIRE_INTERVAL` while
    the function runs on (it caught the exception, or sqlite3 swallowed it in
    a callback). Code that never returns to the interpreter (a C extension)
    is left to the owner's watchdog.

    Started at the first call() only: a writer that serves plain statements
    stays single-threaded.
    """

    def __init__(self, interrupt: Callable[[], object] | None) -> None:
        self._interrupt = interrupt
        self._target = threading.get_ident()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop_at: float | None = None  # None: no call is running
        # When the watching thread's wait ends by itself (inf: only a notify
        # ends it). A call whose stop time comes later needs no wake-up: the
        # thread re-reads the stop time when its wait ends. Waking it for every
        # call cost a thread switch per call() on a busy 2-core machine.
        self._sleeping_until = math.inf
        self.fired = False
        thread = threading.Thread(target=self._watch, name="mpwriter-call-limit", daemon=True)
        thread.start()

    def arm(self, stop_at: float) -> None:
        # The condition's own lock, taken directly: `with self._wake` costs
        # two Python-level calls per call().
        with self._lock:
            self._stop_at = stop_at
            self.fired = False
            if stop_at < self._sleeping_until:
                self._wake.notify()

    def run(self, stop_at: float, call: Callable[[], T], restore: Callable[[], object]) -> T:
        """Run ``call()`` until ``stop_at``; ``restore()`` after it, whatever happened.

        Returns what ``call`` returns. Raises `CallOverrun` if it ran past
        ``stop_at`` (even if it caught the interruption and returned),
        `not_an_exception`'s `RemoteError` for a BaseException that is no
        Exception, or its own exception. ``restore`` puts back what a call()
        function may change (signal handling, the connection's callbacks);
        it runs once the watch is over, so nothing interrupts it.
        """
        fired = False
        try:
            try:
                self.arm(stop_at)
                try:
                    value = call()
                finally:
                    # Before `disarm`: in a child the function forked, this
                    # thread is alone and the watch's lock may be held forever.
                    leave_if_forked()
            finally:
                fired = self.disarm()
        except BaseException as exc:
            # An interruption may land in the finally before its disarm.
            fired = self.disarm() or fired
            restore()
            if fired or isinstance(exc, CallOverrun):
                raise CallOverrun from exc
            if not isinstance(exc, Exception):
                raise not_an_exception(exc) from exc
            raise
        restore()
        if fired:
            raise CallOverrun  # it caught the interruption and returned late
        return value

    def disarm(self) -> bool:
        """Stop watching; True if the function was interrupted (it overran).

        Once this returns, no `CallOverrun` is pending for the writer's
        thread: one raised while this runs is absorbed here, and one set
        but not yet raised is cleared.
        """
        while True:
            try:
                with self._lock:
                    self._stop_at = None
                    fired = self.fired
                if fired:
                    _clear_async_exc(self._target, None)
                return fired
            except CallOverrun:
                continue  # it landed here: the watch is over all the same

    def _watch(self) -> None:
        with self._wake:
            while True:
                stop_at = self._stop_at
                if stop_at is None:
                    self._sleeping_until = math.inf
                    self._wake.wait()
                    continue
                remaining = stop_at - time.monotonic()
                if remaining > 0:
                    self._sleeping_until = stop_at
                    self._wake.wait(remaining)
                    continue
                self.fired = True
                if self._interrupt is not None:
                    self._interrupt()
                _set_async_exc(self._target, CallOverrun)
                signal.pthread_kill(self._target, KICK_SIGNAL)
                self._sleeping_until = time.monotonic() + REFIRE_INTERVAL
                self._wake.wait(REFIRE_INTERVAL)


def ignore_kick(_signum: int, _frame: object) -> None:
    """`KICK_SIGNAL`'s handler: its only job is to make a system call return."""
