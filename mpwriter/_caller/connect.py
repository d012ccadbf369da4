"""`connect`: a handle from the writer's endpoint, for any process of a permitted user.

The connecting side of `mpwriter._wire.endpoint`: connect to the Unix
socket, receive the grant and its descriptors, build a `Writer` from them.
The handle keeps its `Dialer`: when its writer has been closed (or died for
good) and another process starts a writer for the same file, its next call
dials again and goes on with the new writer (`lifetime.Lifetime.revive`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .._errors import AccessDenied, Error, Timeout, UntrustedFile, WriterUnavailable
from .._wire.address import is_server_url
from .._wire.endpoint import (
    GRANT_FDS,
    MESSAGE_MAX,
    REFUSED,
    Offer,
    address,
    endpoint_path,
    peer_credentials,
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

    Only a writer of a user this process trusts is used: the process at the
    endpoint must run as this process's user, or as the owner of the SQLite
    database file (a writer that admits its group), or, for a PostgreSQL
    endpoint, as the owner of the endpoint's directory; and the socket file
    must be that same user's. Anyone else's is refused before anything is
    read from it or sent to it.

    Raises `WriterUnavailable` if no writer serves ``path``, `AccessDenied`
    if this process's user may not use it, `UntrustedFile` if another user
    answers at the endpoint, `Timeout` if the endpoint does not answer in
    time.
    """
    database = None if is_server_url(os.fspath(path)) else os.path.realpath(path)
    dialer = Dialer(endpoint_path(path, endpoint), _shown(os.fspath(path)), database)
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

    def __init__(self, endpoint: str, shown: str, database: str | None) -> None:
        self.endpoint = endpoint
        self.shown = shown  # the database, as the app named it
        self.database = database  # a SQLite file's real name; None for a server

    def dial(self, deadline: float) -> Grant:
        """Ask the endpoint for a handle's descriptors, by ``deadline`` (monotonic).

        Raises `WriterUnavailable` (nothing listens), `AccessDenied`,
        `UntrustedFile` (another user answers) or `Timeout`.
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
            with self._failures():
                sock.settimeout(_remaining(deadline))
                sock.connect(address(dir_fd, directory, name))
            # Before a byte is read: whoever answers gets our requests and
            # reply pipes and sends what we unpickle, so runs code as us.
            self._trust(peer_credentials(sock), found.st_uid, dir_fd)
            with self._failures():
                sock.settimeout(_remaining(deadline))
                message, fds, _, _ = socket.recv_fds(sock, MESSAGE_MAX, GRANT_FDS)
        return self._accept(message, fds)

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """The errors of connecting to the endpoint and reading it, as mpwriter's."""
        try:
            yield
        except TimeoutError:
            raise Timeout(f"the endpoint {self.endpoint} did not answer in time") from None
        except PermissionError as exc:
            raise AccessDenied(f"cannot reach the writer of {self.shown}: {exc}") from exc
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET):
                raise self._none_serves("nothing listens there (a stale socket)") from None
            raise

    def _trust(self, peer: tuple[int, int, int], file_uid: int, dir_fd: int) -> None:
        """Raise `UntrustedFile` unless ``peer`` (pid, uid, gid) is a writer we may use."""
        pid, uid, _ = peer
        trusted = {os.geteuid(): "this process's user"}
        try:
            if self.database is not None:
                owner = os.stat(self.database).st_uid
                trusted.setdefault(owner, f"the owner of {self.database}")
            else:
                owner = os.fstat(dir_fd).st_uid
                trusted.setdefault(owner, f"the owner of {os.path.dirname(self.endpoint)}")
        except OSError:
            pass  # no file to own (or none this process may see): its own user only
        if uid in trusted and file_uid == uid:
            return
        whom = ", ".join(f"{why} (uid {known})" for known, why in trusted.items())
        raise UntrustedFile(
            f"mpwriter: the endpoint {self.endpoint} (a socket of uid {file_uid}) is answered by"
            f" pid {pid} of uid {uid}; only a writer of {whom} is used, from a socket of its own."
            " Nothing was sent to it; remove it if it is not yours"
        )

    def _accept(self, message: bytes, fds: list[int]) -> Grant:
        """The grant in ``message`` and ``fds``, which it owns: closed on any failure."""
        try:
            if message.startswith(REFUSED):
                reason = message[len(REFUSED) :].decode(errors="replace")
                raise AccessDenied(f"the writer of {self.shown} refused this process: {reason}")
            if not message:  # closed without a word: it was stopping
                raise self._none_serves("it closed the connection")
            return self._take(message, fds)
        except Error:
            _close_all(fds)
            raise
        except (ValueError, OSError) as exc:
            _close_all(fds)
            raise WriterUnavailable(
                f"the endpoint {self.endpoint} gave an answer mpwriter cannot use: {exc}"
            ) from None
        except BaseException:
            _close_all(fds)
            raise

    @staticmethod
    def _take(message: bytes, fds: list[int]) -> Grant:
        """Raises ValueError or OSError, having closed nothing, for a grant it cannot use."""
        if len(fds) != GRANT_FDS:
            raise ValueError(f"{len(fds)} descriptors instead of {GRANT_FDS}")
        offer = Offer.decode(message)
        request_fd, registration_fd, state_fd = fds
        os.set_blocking(request_fd, False)
        registration = socket.socket(fileno=registration_fd)
        try:
            registration.setblocking(False)
            # Last: once it returns, the state owns its descriptor (not before).
            state = attach_state(state_fd)
        except BaseException:
            registration.detach()  # the caller closes every descriptor received
            raise
        return Grant(offer, request_fd, registration, state)

    def _none_serves(self, why: str) -> WriterUnavailable:
        return WriterUnavailable(f"no writer serves {self.shown} (endpoint {self.endpoint}: {why})")


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


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
