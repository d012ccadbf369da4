"""Test databases: files, each served by a writer this process starts and closes."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from django.db.backends.sqlite3 import creation  # type: ignore[import-untyped]

from .writers import close_writer


class DatabaseCreation(creation.DatabaseCreation):  # type: ignore[misc]
    """The stock SQLite creation, with the writer closed before a file is deleted.

    A test database must be a file (``TEST: {"NAME": ...}``). Cloning for
    ``--parallel`` runs is not supported: each worker process would need its
    own writer (`NotSupportedError`).
    """

    def _create_test_db(self, verbosity: int, autoclobber: bool, keepdb: bool = False) -> Any:
        name = self._get_test_db_name()
        if not keepdb and not self.is_in_memory_db(name):
            self.connection.close()
            _remove(name)
        return super()._create_test_db(verbosity, autoclobber, keepdb)

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        self.connection.close()
        _remove(test_database_name)

    def _clone_test_db(self, suffix: str, verbosity: int, keepdb: bool = False) -> None:
        from django.db import NotSupportedError  # type: ignore[import-untyped]

        raise NotSupportedError(
            "mpwriter.django does not clone test databases: run the tests with --parallel 1"
        )


def _remove(path: str) -> None:
    """Close this process's writer of ``path``, then delete the file and its WAL."""
    close_writer(path)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)
