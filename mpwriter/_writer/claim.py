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

The lock file is taken with filelock (mode 0600; it never opens through a
symlink) and grants nothing to another user: once it is locked, the name must
still be a regular file owned by this process's user (`UntrustedFile`
otherwise: another user planted it, or a symlink stands there); left at a
wider mode by an older writer, it is narrowed to 0600. filelock does not hand
out its descriptor, so the check reads the name after locking: only someone
who may write the directory could swap the file in between, and such a user
can remove the database anyway. The database file's lock
needs only read access to the file, which is also all that SQLite's own locks
need to block its writer: whoever may read the database can stall its writer
either way (see the Trust model in docs/guarantees.md).
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

import filelock

from .._errors import UntrustedFile, WriterAlreadyRunning
from . import forks

LOCK_SUFFIX = ".mpwriter.lock"


def lock_path(database: str) -> str:
    """The lock file of ``database``: beside its real name, so one per file."""
    return os.path.realpath(database) + LOCK_SUFFIX


def lock_file(path: str) -> filelock.BaseFileLock:
    """The lock of the lock file ``path``, not taken yet (see `take`)."""
    return filelock.UnixFileLock(path, mode=0o600, thread_local=False)


def take(lock: filelock.BaseFileLock, timeout: float) -> bool:
    """Take ``lock`` within ``timeout`` seconds and check the file it locks is ours.

    True once taken and trusted, False if another process holds it. Raises
    `UntrustedFile` (the lock released) for a symlink, something that is not
    a regular file, or a file of another user at that name; or the `OSError`
    of the open.
    """
    path = os.fspath(lock.lock_file)
    try:
        lock.acquire(timeout=timeout, poll_interval=_POLL_INTERVAL)
    except filelock.Timeout:
        return False
    except OSError as exc:
        if os.path.islink(path):
            raise UntrustedFile(
                f"mpwriter: {path} is a symbolic link; mpwriter never follows one there (remove it)"
            ) from exc
        raise
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedFile(f"mpwriter: {path} is not a regular file (remove it)")
        if info.st_uid != os.geteuid():
            raise UntrustedFile(
                f"mpwriter: {path} belongs to uid {info.st_uid}, not to this process's"
                f" uid {os.geteuid()}: another user could hold or change it (remove it)"
            )
        if info.st_mode & 0o077:
            os.chmod(path, 0o600)  # a regular file: lstat just said so
    except BaseException:
        lock.release(force=True)
        raise
    return True


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
        real = os.path.realpath(database)
        self._lock = lock_file(real + LOCK_SUFFIX)
        self._fd: int | None = None
        try:
            # The lock file first: it exists before the database does.
            if not take(self._lock, 0):
                raise WriterAlreadyRunning(
                    f"another mpwriter writer already serves {database!r}"
                    f" (it holds {real + LOCK_SUFFIX!r})"
                )
            # Read-only is enough for flock, and creates nothing but an empty file.
            self._fd = os.open(real, os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
            # A writer that holds the file but not its lock file serves it
            # under another name (a hard link) -- or is exiting: the kernel
            # may drop its two locks a moment apart. Give the latter that moment.
            deadline = time.monotonic() + _EXIT_MOMENT
            while not _try_lock(self._fd):
                if time.monotonic() >= deadline:
                    raise WriterAlreadyRunning(
                        f"another mpwriter writer already serves {database!r} under"
                        f" another name: it holds a lock on the file {real!r} (a hard link?)"
                    )
                # sleep-ok: flock has no bounded blocking form; a few polls at most.
                time.sleep(_POLL_INTERVAL / 5)
            # flock locks belong to the open file, which a forked child shares:
            # a child of a call() that lived on would keep the writer's
            # successors from claiming the database.
            forks.forbid_in_child(real + LOCK_SUFFIX, self._fd)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Release both locks (the database file's by closing its descriptor). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._lock.release(force=True)


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
    between the two locks' release. Raises what `take` raises.
    """
    lock = lock_file(lock_path(database))
    if not take(lock, timeout):
        return False
    lock.release(force=True)
    return True
