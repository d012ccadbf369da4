"""What crosses the writer's endpoint: where it is, and the one message it sends.

A process that is neither the owner nor its descendant gets a handle through
the endpoint, a Unix socket (SOCK_SEQPACKET) that the supervisor listens on
(`mpwriter._owner.endpoint`), beside the database by default. It connects;
the supervisor checks its credentials (SO_PEERCRED) and sends exactly one
message, then closes the connection:

- ``GRANT`` + JSON (path, default timeout, frame key, supervisor pid), with
  SCM_RIGHTS carrying, in this order, the request pipe's write end, the
  callers' end of the registration socket and the shared state's memory
  (`mpwriter._wire.state`): all a `Writer` holds;
- ``REFUSED`` + a message for people: this peer may not use the writer.

JSON rather than pickle: the connecting side unpickles nothing it reads here.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import dataclass

from .address import is_server_url

ENDPOINT_SUFFIX = ".mpwriter.sock"
GRANT = b"G"
REFUSED = b"R"
GRANT_FDS = 3  # request pipe, registration socket, shared state
MESSAGE_MAX = 4096
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of the connected Unix socket ``sock``.

    For the connecting side, those of the process that called listen().
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


@dataclass(frozen=True)
class Offer:
    """What the endpoint tells each permitted peer, besides the descriptors."""

    path: str  # as the handle shows it (a URL without its password)
    timeout: float  # the default per-call timeout given to start()
    frame_key: int

    def encode(self, supervisor_pid: int) -> bytes:
        fields = {
            "path": self.path,
            "timeout": self.timeout,
            "frame_key": self.frame_key,
            "pid": supervisor_pid,
        }
        return GRANT + json.dumps(fields).encode()

    @classmethod
    def decode(cls, message: bytes) -> Offer:
        """Raises ValueError if ``message`` is not a grant."""
        if not message.startswith(GRANT):
            raise ValueError("not a grant")
        fields = json.loads(message[len(GRANT) :])
        try:
            path, timeout, key = fields["path"], fields["timeout"], fields["frame_key"]
        except (KeyError, TypeError):
            raise ValueError("a malformed grant") from None
        if not (isinstance(path, str) and isinstance(timeout, (int, float))):
            raise ValueError("a malformed grant")
        if not isinstance(key, int):
            raise ValueError("a malformed grant")
        return cls(path, float(timeout), key)


def endpoint_path(path: str | os.PathLike[str], endpoint: str | os.PathLike[str] | None) -> str:
    """The endpoint of the writer of ``path``: ``endpoint`` if given, else beside the file.

    A PostgreSQL URL has no file to sit beside: its endpoint must be given.
    """
    if endpoint is not None:
        return os.path.abspath(os.fspath(endpoint))
    path = os.fspath(path)
    if is_server_url(path):
        raise ValueError(
            "a PostgreSQL writer's endpoint has no default place: pass endpoint='/path/to.sock'"
        )
    # Beside the real name, as the lock file: every name of the file finds it.
    return os.path.realpath(path) + ENDPOINT_SUFFIX


def address(directory_fd: int, directory: str, name: str) -> str:
    """An AF_UNIX address for ``name`` in ``directory``, open as ``directory_fd``.

    AF_UNIX addresses hold about 108 bytes: through the descriptor (Linux's
    /proc) the address stays short however deep the directory is; elsewhere
    the full path is used, and must fit.
    """
    if os.path.isdir("/proc/self/fd"):
        return f"/proc/self/fd/{directory_fd}/{name}"
    return os.path.join(directory, name)
