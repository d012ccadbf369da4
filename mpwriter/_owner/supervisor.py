"""The supervisor process: it starts the writers, watches them and replaces them.

::

    owner (start())  --control pipe-->  supervisor  --lifeline pipe-->  writer
    single-threaded:                    single-threaded: forks, reaps    serve()
    no mpwriter thread                  and restarts writers, watchdog

Why a process of its own: supervision needs something that waits on the
writer all the time. In the owner that was a thread, and every later fork of
the owner -- each replacement writer, each gunicorn worker, each ``fork``
pool -- was then a fork of a multi-threaded process (a lock held by that
thread at the instant of the fork stays locked in the child; Python 3.12+
warns). The supervisor is started by `start()` with the chosen
multiprocessing context, has no thread, and forks the writers itself: forking
it is as safe as forking a forkserver. The owner keeps no thread and learns
everything through the shared state (`mpwriter._wire.state`).

Lifelines, so that nothing outlives its parent:

- The owner holds the only write end of the *control* pipe. Its bytes are
  commands (``C`` close: restart no more; ``S`` stop the writer through its
  lifeline; ``K`` kill the writer); EOF means the owner is gone (however it
  died): the supervisor stops the writer, which serves what is queued and
  exits, then reaps it and exits. (Not PR_SET_PDEATHSIG: it fires when the
  *thread* that forked exits, and `start()` may run in a short-lived thread.)
- The supervisor holds the only write end of the writer's *lifeline*: if the
  supervisor dies, the writer serves what is queued and exits.
- The owner knows the supervisor is gone when its *report* pipe reads EOF:
  the supervisor holds its only write end (writers close their inherited
  copy), so no writer outliving it keeps that end open.

Restart policy (`Backoff`), as systemd, Erlang/OTP and Kubernetes' crash-loop
backoff do it: a writer that had served is replaced at once; only writers
that die young (in start-up, or before their first batch) make the next start
wait, 0.05 s doubling up to ``backoff_max``; a healthy run resets that. Past
``max_restarts`` young deaths in a row the status becomes BACKING_OFF: calls
fail fast with `WriterCrashed` while the supervisor keeps trying, logging each
try, until a writer is ready again.

gunicorn's master reaps every child of its own with ``waitpid(-1)``: the
supervisor is its child, but the writers are the supervisor's, so only the
supervisor reaps them and always learns their exit status.
"""

from __future__ import annotations

import array
import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import pickle
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from .._wire.state import (
    BACKING_OFF,
    CLOSED,
    DEAD,
    EXIT_UNKNOWN,
    NEVER_BUSY,
    RESTARTING,
    RUNNING,
    SERVING,
    STARTING,
    STOPPED,
    WAITING,
    describe_exit,
)
from .._writer.engine import WriterConfig
from .._writer.loop import reset_signals, serve
from .endpoint import Endpoint, EndpointConfig, endpoint_fds

log = logging.getLogger("mpwriter")

KILL_GRACE = 2.0  # how long a terminated or killed writer may take to exit
_WATCH_INTERVAL = 0.25  # the watchdog's period
_BACKOFF_FIRST = 0.05
# A writer that stayed up this long counts as healthy even if it never got a
# batch (an idle service whose writer the OOM killer picked).
_HEALTHY_UPTIME = 10.0
_SIDE_MESSAGE_MAX = 4096
_MAX_FDS = 4  # a side message carries one descriptor

# Commands on the control pipe (owner -> supervisor).
CLOSE = b"C"  # the owner closes: start no more writers, exit once the writer has
STOP = b"S"  # as CLOSE, and stop the writer through its lifeline (the queue was full)
KILL = b"K"  # kill the writer now (SIGKILL): it had its chance to stop


@dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor replaces writers; picklable (it travels to the supervisor)."""

    restart: bool = True
    max_restarts: int = 5  # young deaths in a row before callers fail fast
    backoff_max: float = 30.0  # longest wait before the next try
    watchdog_grace: float = 5.0
    start_timeout: float = 30.0


class Backoff:
    """The restart policy's arithmetic, without I/O: what to do after a death."""

    def __init__(self, policy: RestartPolicy) -> None:
        self._policy = policy
        self.young_deaths = 0

    def writer_died(self, *, served: bool, uptime: float) -> tuple[float, bool]:
        """Return (seconds to wait before the next writer, whether calls fail fast meanwhile).

        ``served``: the writer had begun at least one batch. A writer that
        served, or stayed up `_HEALTHY_UPTIME`, resets the count of young
        deaths and is replaced at once.
        """
        if served or uptime >= _HEALTHY_UPTIME:
            self.young_deaths = 0
            return 0.0, False
        self.young_deaths += 1
        # min() first: 2**n overflows a float past n = 1023.
        exponent = min(self.young_deaths - 1, 64)
        delay = min(self._policy.backoff_max, _BACKOFF_FIRST * 2.0**exponent)
        return delay, self.young_deaths > self._policy.max_restarts


# Descriptors only the supervisor may hold: a writer it forks closes its
# copies (see _after_fork_in_child), or it would keep its own lifeline open.
_supervisor_only: list[int] = []


def _after_fork_in_child() -> None:
    if not _supervisor_only:
        return  # not forked from a supervisor
    # Before closing the wake-up pipe: a signal must not write to its number.
    signal.set_wakeup_fd(-1)
    for fd in _supervisor_only:
        with contextlib.suppress(OSError):
            os.close(fd)
    _supervisor_only.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def supervise(
    config: WriterConfig,
    requests: Connection,
    registrations: socket.socket,
    control: Connection,
    report: Connection,
    state: Any,
    policy: RestartPolicy,
    endpoint: EndpointOffer | None = None,
) -> None:
    """Entry point of the supervisor process (a `multiprocessing.Process` target).

    Starts the first writer and reports on ``report`` how its start went
    (what the writer said: ``("ready", pid)`` or ``("error", exc)``, or
    ``("exit", code)`` if it died first); then supervises until the owner
    closes or is gone, or no writer may be started any more. With
    ``endpoint``, it listens there for other processes' handles
    (`mpwriter.connect`) from the first writer's readiness until it stops
    restarting writers.
    """
    _own_signals()
    _supervisor_only.append(report.fileno())
    supervisor = Supervisor(config, requests, registrations, control, report, state, policy)
    supervisor.offer = endpoint
    if endpoint is not None:
        _supervisor_only.extend((endpoint.request.fileno(), endpoint.registration.fileno()))
    supervisor.run()


@dataclass(frozen=True)
class EndpointOffer:
    """The endpoint to open, and the callers' ends it hands out (picklable)."""

    config: EndpointConfig
    request: Connection  # the request pipe's write end
    registration: socket.socket  # the callers' end of the registration socket


def _own_signals() -> None:
    """The writer's own reset (`reset_signals`), and SIGCHLD back to default.

    An owner may ignore SIGCHLD (children then reap themselves): the
    supervisor must reap its writers to learn how they ended. SIGTERM gets
    the supervisor's own handler later: it means "close".
    """
    reset_signals()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


class Supervisor:
    """The supervisor's loop: one writer at a time, restarts, watchdog."""

    def __init__(
        self,
        config: WriterConfig,
        requests: Connection,
        registrations: socket.socket,
        control: Connection,
        report: Connection,
        state: Any,
        policy: RestartPolicy,
    ) -> None:
        self._config = config
        self._state = state
        self._policy = policy
        self._backoff = Backoff(policy)
        self._ctx: Any = multiprocessing.get_context("fork")  # from this single-threaded process
        self._requests: Connection | None = requests
        self._registrations: socket.socket | None = registrations
        self._control: Connection | None = control
        self._report: Connection | None = report
        lifeline_r, lifeline_w = os.pipe()
        self._lifeline_r = lifeline_r
        self._lifeline_w: int | None = lifeline_w
        _supervisor_only.append(lifeline_w)

        self._writer: Any = None  # the current writer's Process, if one runs
        self._ready: Connection | None = None  # its ready pipe, until it has spoken
        self._started_at = 0.0
        self._start_deadline = 0.0
        self._retry_at: float | None = None  # monotonic; when to start the next writer
        self._stopping = False
        self._first = True
        self._sigterm = False  # set by the handler; acted on in the loop
        self.offer: EndpointOffer | None = None
        self._endpoint: Endpoint | None = None

        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_r = wake_r
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        _supervisor_only.extend((wake_r, wake_w))

    def _on_sigterm(self, _signum: int, _frame: object) -> None:
        self._sigterm = True

    # -- the loop -----------------------------------------------------------------

    def run(self) -> None:
        self._launch()
        while True:
            if self._writer is None:
                if self._stopping or self._retry_at is None:
                    break
                if time.monotonic() >= self._retry_at:
                    self._retry_at = None
                    self._launch()
                    continue
            self._wait_once()
        self._close_endpoint()
        self._state.phase = STOPPED
        if self._report is not None:
            self._report.close()

    def _wait_once(self) -> None:
        watched: list[Any] = [self._wake_r]
        if self._endpoint is not None:
            watched.append(self._endpoint.fileno())
        if self._control is not None:
            watched.append(self._control)
        if self._writer is not None:
            watched.append(self._writer.sentinel)
        if self._ready is not None:
            watched.append(self._ready)
        elif (
            self._writer is None
            and self._registrations is not None
            and self._state.status == BACKING_OFF
        ):
            # No writer reads the side socket meanwhile: callers re-registering
            # there would wait for nothing.
            watched.append(self._registrations)
        now = time.monotonic()
        timeout = _WATCH_INTERVAL
        if self._retry_at is not None:
            timeout = min(timeout, self._retry_at - now)
        if self._ready is not None:
            timeout = min(timeout, self._start_deadline - now)
        ready = wait(watched, max(timeout, 0.0))
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
        if self._sigterm and not self._stopping:
            log.warning("mpwriter: the writer's supervisor got SIGTERM; closing the writer")
            self._stop_restarting()
            if self._writer is not None:
                self._writer.terminate()  # the writer's SIGTERM: serve what is queued, exit
        if self._control is not None and self._control in ready:
            self._read_control()
        if self._ready is not None and self._ready in ready:
            self._read_ready()
        if self._writer is not None and self._writer.sentinel in ready:
            self._writer_exited()
        elif self._writer is not None:
            self._watch_writer()
        if self._registrations is not None and self._registrations in ready:
            self._fail_waiting_callers()
        if self._endpoint is not None and self._endpoint.fileno() in ready:
            self._endpoint.answer()

    def _read_control(self) -> None:
        assert self._control is not None
        try:
            commands = os.read(self._control.fileno(), 64)
        except OSError:
            commands = b""
        if not commands:
            self._control.close()
            self._control = None
            if not self._stopping:
                log.warning("mpwriter: the owner process is gone; closing the writer")
            self._stop_restarting()
            self._close_lifeline()
            return
        if CLOSE in commands or STOP in commands:
            self._stop_restarting()
        if STOP in commands:
            self._close_lifeline()
        if KILL in commands and self._writer is not None:
            # No SIGTERM first: the owner sends this once the writer has had
            # all the time close() allowed it (or its start failed), and a
            # SIGTERM would only cost a grace that close() does not have.
            self._writer.kill()

    def _stop_restarting(self) -> None:
        self._stopping = True
        self._retry_at = None
        # At once, before the writer exits and releases the database: new
        # connect() calls fail fast, and a successor can never find this
        # endpoint still bound when it binds its own.
        self._close_endpoint()

    def _close_lifeline(self) -> None:
        if self._lifeline_w is not None:
            _supervisor_only.remove(self._lifeline_w)
            os.close(self._lifeline_w)
            self._lifeline_w = None

    # -- starting a writer -----------------------------------------------------------

    def _launch(self) -> None:
        """Start a writer; it reports on its ready pipe, or dies."""
        assert self._requests is not None
        assert self._registrations is not None
        state = self._state
        state.busy_until = NEVER_BUSY
        if not self._first:
            # Counted first: the new writer may answer stats() before it is reported ready.
            state.restarts += 1
            if state.status == BACKING_OFF:
                log.warning(
                    "mpwriter: starting a writer again (%d died in a row before serving)",
                    self._backoff.young_deaths,
                )
        state.phase = STARTING
        ready_r, ready_w = self._ctx.Pipe(duplex=False)
        # Duplicates: the forked writer uses these (this process's originals
        # are closed in it or harmless there), and they are closed here once it has them.
        writer_ends = (
            Connection(os.dup(self._requests.fileno()), writable=False),
            self._registrations.dup(),
            Connection(os.dup(self._lifeline_r), writable=False),
            ready_w,
        )
        process = self._ctx.Process(
            target=serve,
            name=f"mpwriter {os.path.basename(self._config.path)}",
            args=(self._config, *writer_ends, state),
            daemon=True,
        )
        state.generation += 1
        self._started_at = time.monotonic()
        self._start_deadline = self._started_at + self._policy.start_timeout
        try:
            process.start()
        except OSError as exc:  # fork failed: no memory, no process slot
            ready_r.close()
            log.error("mpwriter: could not start a writer process: %s", exc)
            if self._first:
                self._tell_owner(pickle.dumps(("error", exc)))
                self._stop_restarting()
            else:
                self._died_young_or_not(served=False)
            return
        finally:
            for end in writer_ends:
                end.close()
        self._writer = process
        self._ready = ready_r

    def _read_ready(self) -> None:
        """The starting writer spoke: ready, or an error (it exits after one)."""
        assert self._ready is not None
        try:
            raw = self._ready.recv_bytes()
        except (EOFError, OSError):
            raw = None  # died before it was ready: its sentinel says so
        self._ready.close()
        self._ready = None
        if raw is None:
            return
        status, value = pickle.loads(raw)
        if self._first and status == "ready" and self.offer is not None:
            problem = self._open_endpoint()
            if problem is not None:
                status, raw = "error", pickle.dumps(("error", problem))
        if self._first:
            self._tell_owner(raw)
        if status != "ready":
            if not self._first:
                log.error("mpwriter: a new writer failed to start: %r", value)
            # It exits by itself after an error; the kill only bounds that.
            if not wait([self._writer.sentinel], KILL_GRACE):
                self._kill_writer()
            return
        state = self._state
        state.phase = SERVING
        if not self._first:
            log.warning("mpwriter: writer restarted (pid %s)", value)
            if state.status == BACKING_OFF:
                state.status = RUNNING
                log.warning("mpwriter: a writer serves again (pid %s); calls are accepted", value)
        self._first = False
        if not self._policy.restart:
            # Nothing to hand to a successor: the writer holds the only far
            # ends, so that its death shows to callers at once as EPIPE and EOF.
            self._release_far_ends()

    def _open_endpoint(self) -> OSError | None:
        """Listen at the endpoint; return what prevented it, if anything."""
        offer = self.offer
        assert offer is not None
        ends = endpoint_fds(offer.request, offer.registration, self._state)
        try:
            self._endpoint = Endpoint(offer.config, ends)
        except OSError as exc:
            log.error("mpwriter: cannot listen at %s: %s", offer.config.path, exc)
            return exc
        _supervisor_only.extend(self._endpoint.descriptors())
        return None

    def _close_endpoint(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            for fd in endpoint.descriptors():
                _supervisor_only.remove(fd)
            endpoint.close()

    def _tell_owner(self, raw: bytes) -> None:
        if self._report is not None:
            with contextlib.suppress(OSError):
                self._report.send_bytes(raw)

    # -- a writer that ends ---------------------------------------------------------------

    def _writer_exited(self) -> None:
        process = self._writer
        # The sentinel can fire a moment before the exit status is ready.
        process.join(KILL_GRACE)
        code = process.exitcode
        self._writer = None
        state = self._state
        never_ready = self._ready is not None
        if self._ready is not None:
            self._ready.close()
            self._ready = None
        if code is None:
            # Only this process reaps it, so this is not expected; keep the record straight.
            multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
            code = EXIT_UNKNOWN
        state.last_exit = code
        if self._first:
            # The first writer never got ready: start() raises; no restart.
            if never_ready:
                self._tell_owner(pickle.dumps(("exit", code)))
            self._stop_restarting()
            return
        if self._stopping or state.status == CLOSED:
            self._stop_restarting()  # asked to stop: close(), SIGTERM, or the lifeline
            return
        log.error("mpwriter: the writer process (pid %s) %s", process.pid, describe_exit(code))
        if not self._policy.restart:
            state.status = DEAD
            self._stop_restarting()
            self._release_far_ends()
            return
        served = not never_ready and state.busy_until != NEVER_BUSY
        self._died_young_or_not(served=served)

    def _died_young_or_not(self, *, served: bool) -> None:
        state = self._state
        uptime = time.monotonic() - self._started_at
        delay, fail_fast = self._backoff.writer_died(served=served, uptime=uptime)
        state.young_deaths = self._backoff.young_deaths
        state.retry_at = time.time() + delay
        self._retry_at = time.monotonic() + delay
        if fail_fast:
            state.phase = WAITING
            if state.status == RUNNING:
                state.status = BACKING_OFF
            log.error(
                "mpwriter: %d writers in a row died before serving; calls fail at once"
                " (WriterCrashed) while backing off until %s",
                self._backoff.young_deaths,
                time.strftime("%H:%M:%S", time.localtime(state.retry_at)),
            )
            self._fail_waiting_callers()
        else:
            state.phase = RESTARTING
            if delay:
                log.warning(
                    "mpwriter: the writer died before serving (%d in a row); restarting in %.2f s",
                    self._backoff.young_deaths,
                    delay,
                )

    def _fail_waiting_callers(self) -> None:
        """While calls fail fast and no writer runs: close the reply pipes that
        callers handed over on the side socket, so that they see EOF now
        (`WriterCrashed`, outcome unknown) instead of waiting out their timeout."""
        if self._state.status != BACKING_OFF or self._writer is not None:
            return
        sock = self._registrations
        assert sock is not None
        room = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
        while True:
            # Not socket.recv_fds: before Python 3.12 it ignores its flags.
            try:
                _, ancillary, _, _ = sock.recvmsg(_SIDE_MESSAGE_MAX, room, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                    for fd in fds:
                        os.close(fd)

    # -- watchdog and kills -------------------------------------------------------------------

    def _watch_writer(self) -> None:
        now = time.monotonic()
        if self._ready is not None and now > self._start_deadline:
            log.error(
                "mpwriter: the writer (pid %s) was not ready within %s s; killing it",
                self._writer.pid,
                self._policy.start_timeout,
            )
            if self._first:
                self._tell_owner(
                    pickle.dumps(("timeout", f"not ready within {self._policy.start_timeout} s"))
                )
            self._kill_writer()
            return
        busy_until = self._state.busy_until
        if busy_until > 0 and now > busy_until + self._policy.watchdog_grace:
            log.error(
                "mpwriter: the writer (pid %s) is stuck %.1f s past a request's limit; killing it",
                self._writer.pid,
                now - busy_until,
            )
            self._state.busy_until = 0.0
            self._writer.kill()

    def _kill_writer(self) -> None:
        """Terminate, then kill, the writer, reaping it with deadlines."""
        process = self._writer
        if process is None:
            return
        for stop in (process.terminate, process.kill):
            if wait([process.sentinel], 0):
                break
            stop()
            wait([process.sentinel], KILL_GRACE)
        # Its death is handled as any other: _writer_exited, from the sentinel.

    def _release_far_ends(self) -> None:
        if self._registrations is not None:
            self._registrations.close()
            self._registrations = None
        if self._requests is not None:
            self._requests.close()
            self._requests = None
