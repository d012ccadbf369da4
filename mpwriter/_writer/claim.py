"""The single-writer rule of a SQLite file: one writer per file, whatever name it is given.

A writer claims its database with two flock(2) locks, both released by the
kernel when the writer process ends, however it ends:

1. The lock file beside the file's *real* name, ``realpath(db) +
   ".mpwriter.lock"``. Every name that reaches the file through symlinks (to
   the file, or to a directory above it), ``..`` or a relative path resolves
   to that one real name, and so to that one lock file. It can be taken
   before the database exists: two writers creating a new database through
   names that resolve alike are serialized here.
2. The database file itself, opened (created empty if missing: SQLite takes
   an empty file for a new database). A hard link or a bind mount reaches the
   same file through a name ``realpath`` cannot tie to the first, but it is
   the same inode, and flock locks the inode. SQLite locks with fcntl
   (POSIX) byte-range locks, which do not interact with flock on Linux and
   the BSDs.

The lock file grants nothing to another user: it is created mode 0600
without following symlinks, and one found in place must be a regular file
owned by this process's user (`UntrustedFile` otherwise); left at a wider
mode by an older writer, it is narrowed to 0600. The database file's lock
needs only read access to the file, which is also all that SQLite's own locks
need to block its writer: whoever may read the database can stall its writer
either way (see the Trust model in docs/guarantees.md).
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

from .._errors import UntrustedFile, WriterAlreadyRunning

LOCK_SUFFIX = ".mpwriter.lock"


def lock_path(database: str) -> str:
    """The lock file of ``database``: beside its real name, so one per file."""
    return os.path.realpath(database) + LOCK_SUFFIX


def open_private(path: str) -> int:
    """Open (create) ``path`` read-write as this user's private file; return the descriptor.

    Created mode 0600; never through a symlink; an existing file must be a
    regular file owned by this process's effective user, and is narrowed to
    0600. Raises `UntrustedFile` otherwise, or the `OSError` of the open.
    """
    try:
        fd = os.open(
            path,
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            0o600,
        )
    except OSError as exc:
        if os.path.islink(path):
            raise UntrustedFile(
                f"mpwriter: {path} is a symbolic link; mpwriter never follows one there (remove it)"
            ) from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedFile(f"mpwriter: {path} is not a regular file (remove it)")
        if info.st_uid != os.geteuid():
            raise UntrustedFile(
                f"mpwriter: {path} belongs to uid {info.st_uid}, not to this process's"
                f" uid {os.geteuid()}: another user could hold or change it (remove it)"
            )
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Claim:
    """A writer's hold on its database file: the lock file and the file itself.

    Release it only once the process has closed its SQLite connections to
    the file: closing any descriptor of a file drops every fcntl lock the
    process holds on it, SQLite's included (POSIX semantics).
    """

    def __init__(self, database: str) -> None:
        """Take both locks of ``database`` or raise.

        Raises `WriterAlreadyRunning` if another writer holds either,
        `UntrustedFile` for a lock file this user cannot trust, or the
        `OSError` of opening the database file.
        """
        self._fds: list[int] = []
        real = os.path.realpath(database)
        try:
            # The lock file first: it exists before the database does.
            self._fds.append(open_private(real + LOCK_SUFFIX))
            if not _try_lock(self._fds[-1]):
                raise WriterAlreadyRunning(
                    f"another mpwriter writer already serves {database!r}"
                    f" (it holds {real + LOCK_SUFFIX!r})"
                )
            # Read-only is enough for flock, and creates nothing but an empty file.
            self._fds.append(
                os.open(real, os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
            )
            # A writer that holds the file but not its lock file serves it
            # under another name (a hard link) -- or is exiting: the kernel
            # may drop its two locks a moment apart. Give the latter that moment.
            deadline = time.monotonic() + _EXIT_MOMENT
            while not _try_lock(self._fds[-1]):
                if time.monotonic() >= deadline:
                    raise WriterAlreadyRunning(
                        f"another mpwriter writer already serves {database!r} under"
                        f" another name: it holds a lock on the file {real!r} (a hard link?)"
                    )
                # sleep-ok: flock has no bounded blocking form; a few polls at most.
                time.sleep(_POLL_INTERVAL / 5)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Release both locks (closing the descriptors releases them). Idempotent."""
        while self._fds:
            os.close(self._fds.pop())


_POLL_INTERVAL = 0.05
_EXIT_MOMENT = 0.1


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def await_release(database: str, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds until no writer holds ``database``'s lock file.

    True once none does. Probes the lock file only: opening and closing the
    database file here would drop this process's SQLite locks on it (a
    gunicorn master may hold readers), and `Claim` waits out the moment
    between the two locks' release. Raises what `open_private` raises.
    """
    deadline = time.monotonic() + timeout
    fd = open_private(lock_path(database))
    try:
        while not _try_lock(fd):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # sleep-ok: flock has no bounded blocking form; this polls as filelock does.
            time.sleep(min(_POLL_INTERVAL, left))
    finally:
        os.close(fd)
    return True
