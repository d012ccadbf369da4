"""The writer's endpoint, the listening side: a Unix socket that hands out handles.

The supervisor holds the pipes a handle needs (it outlives every writer), so
it listens, in its wait loop, without a thread; see `mpwriter._wire.endpoint`
for what crosses. An accepted peer is answered at once and the connection
closed: the supervisor keeps nothing per peer, so any number of short-lived
processes leave it as they found it.

Access: the socket file is created without access for others (umask 077, or
007 with a group given), so the kernel already refuses them at connect();
the peer's credentials (SO_PEERCRED) are checked again, so that a socket
file opened up by hand still admits only the writer's own user and the
group given. Binding: to a fresh temporary name in the same directory,
then renamed over the endpoint's name. rename() replaces a directory entry
and never follows a symlink there; it runs only once this supervisor's
writer is ready, which for SQLite means it holds the database's lock file,
so whatever stands at the name, live or not, is a stale endpoint or another
user's plant, and is replaced without a look (a socket planted there must
not keep the writer from starting). In a sticky directory another user's
file cannot be replaced: `UntrustedFile`. A PostgreSQL writer has no lock
file: there, a socket of this user that still accepts is left alone and
start() fails (`EndpointInUse`, a `WriterAlreadyRunning`).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from typing import Any

from .._errors import UntrustedFile, WriterAlreadyRunning
from .._wire.address import is_server_url
from .._wire.endpoint import REFUSED, Offer, address, peer_credentials

log = logging.getLogger("mpwriter")

_BACKLOG = 128


@dataclass(frozen=True)
class EndpointConfig:
    """Where to listen, who may connect, and what to hand over (picklable)."""

    path: str
    offer: Offer
    allow_gid: int | None = None


class EndpointInUse(WriterAlreadyRunning, OSError):
    """Another live writer of this user answers at this (PostgreSQL) endpoint."""


class Endpoint:
    """A bound, listening endpoint; `answer` serves the peers waiting on it."""

    def __init__(self, config: EndpointConfig, fds: tuple[int, int, int]) -> None:
        """Bind and listen at ``config.path``; ``fds`` are handed to each peer (not owned).

        Raises `EndpointInUse` if a live endpoint of this user answers there
        (PostgreSQL only: a SQLite writer holds its database's lock, so what
        is there is stale or planted, and replaced), `UntrustedFile` if
        another user's file there cannot be replaced, OSError if the
        directory cannot take the socket.
        """
        self._config = config
        self._fds = array.array("i", fds)
        self._grant = config.offer.encode(os.getpid())
        self._directory, self._name = os.path.split(config.path)
        self._dir_fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if is_server_url(config.offer.path):
                self._refuse_if_live()
            self._sock, self._identity = self._bind()
        except BaseException:
            os.close(self._dir_fd)
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def descriptors(self) -> tuple[int, int]:
        """What only the supervisor may hold (its writers close their copies)."""
        return self._sock.fileno(), self._dir_fd

    def _refuse_if_live(self) -> None:
        try:
            found = os.stat(self._name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(found.st_mode):
            return  # replaced by the rename, never followed
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.settimeout(1.0)
            probe.connect(address(self._dir_fd, self._directory, self._name))
            _, uid, _ = peer_credentials(probe)
        except OSError:
            return  # stale: nothing listens
        finally:
            probe.close()
        if uid != os.geteuid():
            return  # another user's: no writer of ours; replaced if the directory lets us
        raise EndpointInUse(
            errno.EADDRINUSE, f"another mpwriter writer answers at {self._config.path}"
        )

    def _bind(self) -> tuple[socket.socket, tuple[int, int]]:
        temporary = f".mpwriter-{os.getpid()}-{secrets.token_hex(4)}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # umask is per process: the supervisor runs no thread that could race it.
            old = os.umask(0o077 if self._config.allow_gid is None else 0o007)
            try:
                sock.bind(address(self._dir_fd, self._directory, temporary))
            finally:
                os.umask(old)
            try:
                if self._config.allow_gid is not None:
                    os.chown(
                        temporary, -1, self._config.allow_gid, dir_fd=self._dir_fd,
                        follow_symlinks=False,
                    )  # fmt: skip
                sock.listen(_BACKLOG)
                sock.setblocking(False)
                self._rename_into_place(temporary)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=self._dir_fd)
                raise
            found = os.stat(self._name, dir_fd=self._dir_fd, follow_symlinks=False)
        except BaseException:
            sock.close()
            raise
        return sock, (found.st_dev, found.st_ino)

    def _rename_into_place(self, temporary: str) -> None:
        try:
            os.rename(temporary, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except PermissionError as exc:
            # A sticky directory (/tmp) lets only its owner replace a file.
            try:
                owner = os.stat(self._name, dir_fd=self._dir_fd, follow_symlinks=False).st_uid
            except OSError:
                raise exc from None
            if owner == os.geteuid():
                raise
            raise UntrustedFile(
                f"mpwriter: {self._config.path} belongs to uid {owner}, not to this process's"
                f" uid {os.geteuid()}, and this user may not replace it: another user's"
                " socket stands where this writer listens (remove it)"
            ) from exc

    def answer(self) -> None:
        """Answer every peer waiting: a grant with the descriptors, or a refusal."""
        while True:
            try:
                peer, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the peer waits in the backlog
                log.error("mpwriter: the endpoint cannot accept a connection: %s", exc)
                return
            with peer:
                peer.setblocking(False)
                self._answer_one(peer)

    def _answer_one(self, peer: socket.socket) -> None:
        pid, uid, gid = peer_credentials(peer)
        try:
            if self._permits(pid, uid, gid):
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, self._fds.tobytes())]
                peer.sendmsg([self._grant], ancillary)
            else:
                log.warning(
                    "mpwriter: refused a connection from pid %d (uid %d, gid %d)", pid, uid, gid
                )
                peer.send(REFUSED + _refusal(uid).encode())
        except OSError as exc:  # the peer went away already, or its buffer is full
            log.info("mpwriter: could not answer pid %d at the endpoint: %s", pid, exc)

    def _permits(self, pid: int, uid: int, gid: int) -> bool:
        if uid == os.geteuid():
            return True
        wanted = self._config.allow_gid
        if wanted is None:
            return False
        return gid == wanted or wanted in _supplementary_groups(pid)

    def close(self) -> None:
        """Stop listening; remove the socket file if it is still this endpoint's."""
        if self._sock.fileno() < 0:
            return
        self._sock.close()
        try:
            found = os.stat(self._name, dir_fd=self._dir_fd, follow_symlinks=False)
            if (found.st_dev, found.st_ino) == self._identity:
                os.unlink(self._name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._dir_fd)


def _refusal(uid: int) -> str:
    return (
        f"uid {uid} may not use this writer: only its own user (uid {os.geteuid()})"
        " and the group given to start(allow_group=) may connect"
    )


def _supplementary_groups(pid: int) -> set[int]:
    """The peer's supplementary groups (SO_PEERCRED gives its primary group only).

    Read right after accept(), while the peer waits for its answer.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass  # gone, or no /proc: only the primary group counts
    return set()


def group_id(group: int | str) -> int:
    """A group's id, from its id or name; raises ValueError for an unknown name."""
    if isinstance(group, int):
        return group
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {group!r}") from None


def endpoint_fds(*ends: Any) -> tuple[int, int, int]:
    """The descriptors of (request pipe write end, registration socket, state)."""
    request, registration, state = ends
    return request.fileno(), registration.fileno(), state.fd
