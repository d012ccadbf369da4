"""The writer's figures, published to a file for ``python -m mpwriter stats``.

An operator looks at a writer exactly when it is slow, stuck or flooded, so
the command line must not ask it anything through the request queue. Instead
the writer rewrites a small JSON snapshot (`_wire.stats.Snapshot`) beside the
database about once a second, from its housekeeping, which runs between
batches and when idle. A writer stuck inside one batch cannot publish: its
snapshot's age grows, and the command line says so.

The file is replaced atomically (a new file, then `os.replace`), so a reader
sees a whole snapshot or the previous one. The new file is created
exclusively under a random name and without following symlinks, so a link
planted beside the database cannot redirect the write; its mode is the
database file's without write bits for group and others: whoever may read the
database may read its figures, and only the writer's user can change them.
The snapshot is removed when the writer closes, before it releases its lock.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time

from .._wire.stats import SNAPSHOT_FORMAT, Snapshot, Stats, snapshot_path

log = logging.getLogger("mpwriter")

PUBLISH_INTERVAL = 1.0


class Publisher:
    """Publishes one writer's snapshot; does nothing for a database with no place for one."""

    def __init__(self, database: str) -> None:
        self.path = snapshot_path(database)
        self._database = os.path.realpath(database)
        self._next_at = 0.0
        self._failing = False

    def due(self) -> bool:
        """Whether a snapshot should be published now (at most once a second)."""
        return self.path is not None and time.monotonic() >= self._next_at

    def publish(self, stats: Stats, closing: bool) -> None:
        """Replace the snapshot with ``stats``; a failure is logged, never raised.

        Publishing is a convenience for operators: a directory that refuses
        the file must not stop the writer from serving.
        """
        path = self.path
        if path is None:
            return
        now = time.monotonic()
        self._next_at = now + PUBLISH_INTERVAL
        snapshot: Snapshot = {
            "format": SNAPSHOT_FORMAT,
            "database": self._database,
            "pid": os.getpid(),
            "state": "closing" if closing else "serving",
            "published_at": time.time(),
            "monotonic": now,
            "stats": stats,
        }
        try:
            self._replace(path, json.dumps(snapshot).encode())
        except OSError as exc:
            if not self._failing:
                log.warning(
                    "mpwriter: cannot publish the writer's figures to %s (%s);"
                    " `python -m mpwriter stats` will not see them",
                    path,
                    exc,
                )
            self._failing = True
            return
        if self._failing:
            log.warning("mpwriter: publishing the writer's figures to %s works again", path)
            self._failing = False

    def _replace(self, path: str, data: bytes) -> None:
        temporary = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        # O_EXCL fails on any existing name, a symlink included: nothing planted
        # there is followed or overwritten.
        fd = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            try:
                os.fchmod(fd, self._mode())
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            # rename replaces a symlink at ``path`` itself, never its target.
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    def _mode(self) -> int:
        try:
            return os.stat(self._database).st_mode & 0o644
        except OSError:
            return 0o600  # the database is gone: show nobody else

    def remove(self) -> None:
        """Remove the snapshot (clean shutdown, while the writer still holds its lock)."""
        if self.path is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("mpwriter: cannot remove the writer's figures at %s: %s", self.path, exc)
