"""`connect`: a handle from the writer's endpoint, for any process of a permitted user.

The connecting side of `mpwriter._wire.endpoint`: connect to the Unix
socket, receive the grant and its descriptors, build a `Writer` from them.
The handle keeps its `Dialer`: when its writer has been closed (or died for
good) and another process starts a writer for the same file, its next call
dials again and goes on with the new writer (`Writer._revive`).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from .._errors import AccessDenied, Timeout, WriterUnavailable
from .._wire.address import is_server_url
from .._wire.endpoint import (
    GRANT_FDS,
    MESSAGE_MAX,
    REFUSED,
    Offer,
    address,
    endpoint_path,
)
from .._wire.state import attach_state
from .handle import Writer

_DEFAULT_CONNECT_TIMEOUT = 10.0


def connect(
    path: str | os.PathLike[str],
    *,
    timeout: float | None = None,
    endpoint: str | os.PathLike[str] | None = None,
) -> Writer:
    """A handle on the writer that serves ``path``, however it was started.

    The handle has the whole API, guarantees and errors of the one `start()`
    returns, except that `Writer.close` only releases it. ``timeout`` is its
    default per-call timeout (by default the one given to `start()`) and
    bounds this call too (10 s by default). ``endpoint`` is the writer's
    Unix socket, by default ``PATH.mpwriter.sock`` beside a SQLite
    database; a PostgreSQL URL needs it (the ``endpoint`` given to `start`).

    When the writer is closed and another process starts one for ``path``,
    the handle's next call goes on with the new writer by itself; while none
    serves, calls fail with `WriterClosed` or `WriterCrashed` (not sent): at
    once when nothing listens on the endpoint, and within the call's own
    timeout (``post``: its ``max_block``) when something there does not
    answer. Works in forked children of the connecting process.

    Raises `WriterUnavailable` if no writer serves ``path``, `AccessDenied`
    if this process's user may not use it, `Timeout` if the endpoint does
    not answer in time.
    """
    dialer = Dialer(endpoint_path(path, endpoint), _shown(os.fspath(path)))
    limit = _DEFAULT_CONNECT_TIMEOUT if timeout is None else timeout
    grant = dialer.dial(time.monotonic() + limit)
    return Writer(
        grant.offer.path,
        grant.offer.timeout if timeout is None else timeout,
        grant.request_fd,
        grant.registration,
        grant.state,
        frame_key=grant.offer.frame_key,
        dialer=dialer,
    )


@dataclass
class Grant:
    """What the endpoint handed over: all a `Writer` holds."""

    offer: Offer
    request_fd: int
    registration: socket.socket
    state: Any


class Dialer:
    """Connects to one endpoint; picklable (a path), so it travels with its handle."""

    def __init__(self, endpoint: str, shown: str) -> None:
        self.endpoint = endpoint
        self.shown = shown  # the database, as the app named it

    def dial(self, deadline: float) -> Grant:
        """Ask the endpoint for a handle's descriptors, by ``deadline`` (monotonic).

        Raises `WriterUnavailable` (nothing listens), `AccessDenied` or `Timeout`.
        """
        directory, name = os.path.split(self.endpoint)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._none_serves(f"{directory} does not exist") from None
        except PermissionError as exc:
            raise AccessDenied(f"cannot reach the writer of {self.shown}: {exc}") from exc
        try:
            return self._dial_in(dir_fd, directory, name, deadline)
        finally:
            os.close(dir_fd)

    def _dial_in(self, dir_fd: int, directory: str, name: str, deadline: float) -> Grant:
        try:
            found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise self._none_serves("nothing listens there") from None
        except PermissionError as exc:
            raise AccessDenied(f"cannot reach the writer of {self.shown}: {exc}") from exc
        if not stat.S_ISSOCK(found.st_mode):
            raise self._none_serves("it is not a socket")  # a symlink is never followed
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            try:
                sock.settimeout(_remaining(deadline))
                sock.connect(address(dir_fd, directory, name))
                sock.settimeout(_remaining(deadline))
                message, fds, _, _ = socket.recv_fds(sock, MESSAGE_MAX, GRANT_FDS)
            except TimeoutError:
                raise Timeout(f"the endpoint {self.endpoint} did not answer in time") from None
            except PermissionError as exc:
                raise AccessDenied(f"cannot reach the writer of {self.shown}: {exc}") from exc
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET):
                    raise self._none_serves("nothing listens there (a stale socket)") from None
                raise
        return self._accept(message, fds)

    def _accept(self, message: bytes, fds: list[int]) -> Grant:
        if message.startswith(REFUSED):
            for fd in fds:
                os.close(fd)
            reason = message[len(REFUSED) :].decode(errors="replace")
            raise AccessDenied(f"the writer of {self.shown} refused this process: {reason}")
        try:
            if len(fds) != GRANT_FDS:
                raise ValueError(f"{len(fds)} descriptors instead of {GRANT_FDS}")
            offer = Offer.decode(message)
            request_fd, registration_fd, state_fd = fds
            state = attach_state(state_fd)  # owns it from here
        except ValueError as exc:
            for fd in fds:
                os.close(fd)
            if not message:  # closed without a word: it was stopping
                raise self._none_serves("it closed the connection") from None
            raise WriterUnavailable(
                f"the endpoint {self.endpoint} gave an answer mpwriter cannot use: {exc}"
            ) from None
        registration = socket.socket(fileno=registration_fd)
        registration.setblocking(False)
        os.set_blocking(request_fd, False)
        return Grant(offer, request_fd, registration, state)

    def _none_serves(self, why: str) -> WriterUnavailable:
        return WriterUnavailable(f"no writer serves {self.shown} (endpoint {self.endpoint}: {why})")


def _shown(path: str) -> str:
    """``path`` for messages: a URL without its user part (and so its password)."""
    if not is_server_url(path):
        return path
    parts = urllib.parse.urlsplit(path)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
