"""One writer per database file whatever its name, and side files no other user can use.

The single-writer rule is keyed on the file itself: a symlink to it or to a
directory above it, a hard link, a relative name all reach the writer that
serves it. The lock file (and the stats snapshot) give another local user no
way to keep the writer from starting or to forge what it publishes. Tests
that act as another user run as root and fork a child that drops to
``nobody``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mpwriter
from conftest import NOBODY, SCHEMA, as_nobody, count_rows

LOCK_SUFFIX = ".mpwriter.lock"
SNAPSHOT_SUFFIX = ".mpwriter-stats.json"

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="acts as another user: needs root")


def _symlink_to_the_file(db: Path, aliases: Path) -> str:
    link = aliases / "link.db"
    link.symlink_to(db)
    return str(link)


def _symlink_to_its_directory(db: Path, aliases: Path) -> str:
    link = aliases / "linked-dir"
    link.symlink_to(db.parent, target_is_directory=True)
    return str(link / db.name)


def _hard_link(db: Path, aliases: Path) -> str:
    link = aliases / "hard.db"
    os.link(db, link)
    return str(link)


def _relative_name_through_a_symlinked_directory(db: Path, aliases: Path) -> str:
    # "linked-dir/../<dir>/app.db": abspath drops "linked-dir/.." by the letters,
    # the kernel resolves it in the link's target's parent.
    link = aliases / "linked-dir"
    link.symlink_to(db.parent, target_is_directory=True)
    return f"linked-dir/../{db.parent.name}/{db.name}"  # relative to ``aliases``, the cwd


ALIASES: dict[str, Callable[[Path, Path], str]] = {
    "symlink to the file": _symlink_to_the_file,
    "symlink to its directory": _symlink_to_its_directory,
    "hard link": _hard_link,
    "relative name": _relative_name_through_a_symlinked_directory,
}


@pytest.fixture
def aliases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Another directory, the working directory, where the aliases go."""
    directory = tmp_path / "aliases"
    directory.mkdir()
    monkeypatch.chdir(directory)
    return directory


@pytest.fixture
def db_in_subdir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    return directory / "app.db"


@pytest.mark.parametrize("kind", ALIASES)
def test_a_second_writer_through_any_alias_of_the_file_is_refused(
    kind: str, db_in_subdir: Path, aliases: Path
) -> None:
    with mpwriter.start(db_in_subdir, init=SCHEMA, timeout=10.0, context="fork") as writer:
        alias = ALIASES[kind](db_in_subdir, aliases)
        assert os.path.samefile(alias, db_in_subdir)
        with pytest.raises(mpwriter.WriterAlreadyRunning, match="already serves"):
            mpwriter.start(alias, timeout=10.0, context="fork")
        assert writer.execute("INSERT INTO items(seq) VALUES (1)").rowcount == 1
    # Once it is closed, the alias may serve the same file.
    with mpwriter.start(alias, timeout=10.0, context="fork") as successor:
        assert successor.execute("INSERT INTO items(seq) VALUES (2)").rowcount == 1
        with pytest.raises(mpwriter.WriterAlreadyRunning):
            mpwriter.start(db_in_subdir, timeout=10.0, context="fork")
    assert count_rows(db_in_subdir) == 2


def test_a_symlink_to_a_database_not_created_yet_is_the_same_file(
    db_in_subdir: Path, aliases: Path
) -> None:
    link = aliases / "link.db"
    link.symlink_to(db_in_subdir)  # dangling until a writer creates the file
    with mpwriter.start(link, init=SCHEMA, timeout=10.0, context="fork") as writer:
        assert db_in_subdir.is_file()
        with pytest.raises(mpwriter.WriterAlreadyRunning):
            mpwriter.start(db_in_subdir, timeout=10.0, context="fork")
        assert writer.execute("INSERT INTO items(seq) VALUES (1)").rowcount == 1
    assert count_rows(db_in_subdir) == 1


def run_stats(name: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mpwriter", "stats", name],
        capture_output=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("kind", ["symlink to the file", "symlink to its directory"])
def test_connect_through_a_symlink_reaches_the_writer_of_the_file(
    kind: str, db_in_subdir: Path, aliases: Path
) -> None:
    with mpwriter.start(db_in_subdir, init=SCHEMA, timeout=10.0, context="fork") as writer:
        alias = ALIASES[kind](db_in_subdir, aliases)
        connected = mpwriter.connect(alias)
        try:
            assert connected.execute("INSERT INTO items(seq) VALUES (1)").rowcount == 1
            assert connected.stats()["pid"] == writer.stats()["pid"]
        finally:
            connected.close()
        assert run_stats(alias).returncode == 0  # and stats, through the same name
    assert count_rows(db_in_subdir) == 1


def test_connect_and_stats_through_a_hard_link_elsewhere_find_no_writer(
    db_in_subdir: Path, aliases: Path
) -> None:
    # The documented limit: the endpoint and the figures are found by name,
    # beside the real name; a hard link in another directory has another one.
    with mpwriter.start(db_in_subdir, init=SCHEMA, timeout=10.0, context="fork") as writer:
        writer.stats()  # served after the writer's first snapshot
        link = _hard_link(db_in_subdir, aliases)
        with pytest.raises(mpwriter.WriterUnavailable, match="nothing listens there"):
            mpwriter.connect(link)
        assert run_stats(link).returncode == 1
        assert run_stats(str(db_in_subdir)).returncode == 0


# -- side files and other users ----------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory others may enter and read, but only its owner may write.

    Not under tmp_path: pytest makes that 0700, which "nobody" cannot enter.
    """
    directory = tempfile.mkdtemp(prefix="mpwriter-trust-")
    os.chmod(directory, 0o755)
    try:
        yield Path(directory)
    finally:
        shutil.rmtree(directory)


def test_the_lock_file_is_private_to_the_writers_user(db_path: Path) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork"):
        lock = Path(f"{db_path}{LOCK_SUFFIX}")
        info = lock.lstat()
        assert info.st_mode & 0o777 == 0o600
        assert info.st_uid == os.geteuid()


def test_a_lock_file_left_readable_by_others_is_narrowed(db_path: Path) -> None:
    lock = Path(f"{db_path}{LOCK_SUFFIX}")
    lock.touch(mode=0o644)
    os.chmod(lock, 0o644)
    with mpwriter.start(db_path, init=SCHEMA, context="fork") as writer:
        assert lock.stat().st_mode & 0o777 == 0o600
        assert writer.execute("INSERT INTO items(seq) VALUES (1)").rowcount == 1


def _lock_each(paths: list[str]) -> str:
    """Open and flock each of ``paths``; what happened, one word each."""
    outcomes = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # kept open until the child exits
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            outcomes.append("locked")
        except OSError as exc:
            outcomes.append(errno.errorcode[exc.errno or 0])
    return " ".join(outcomes)


@as_root
def test_another_user_cannot_lock_the_writer_out(shared_dir: Path) -> None:
    db = shared_dir / "app.db"
    mpwriter.start(db, init=SCHEMA, context="fork").close()  # the lock file now exists
    # Others get no access to the database either: SQLite's own locks, like
    # the writer's lock on the file, need only read access.
    os.chmod(db, 0o640)
    with as_nobody(lambda: _lock_each([f"{db}{LOCK_SUFFIX}", str(db)])) as outcome:
        assert outcome == "EACCES EACCES"
        # While that user's process still runs, a writer starts (as after a crash).
        with mpwriter.start(db, context="fork") as writer:
            assert writer.execute("INSERT INTO items(seq) VALUES (1)").rowcount == 1


@as_root
def test_a_database_others_may_read_is_one_they_can_lock_the_writer_out_of(
    shared_dir: Path,
) -> None:
    # The documented limit: read access is all a flock needs (and all
    # SQLite's own locks need to stall its writer), so the mode of the
    # database decides who can keep its writer from starting.
    db = shared_dir / "app.db"
    mpwriter.start(db, init=SCHEMA, context="fork").close()
    os.chmod(db, 0o644)
    with as_nobody(lambda: _lock_each([f"{db}{LOCK_SUFFIX}", str(db)])) as outcome:
        assert outcome == "EACCES locked"
        with pytest.raises(mpwriter.WriterAlreadyRunning, match="already serves"):
            mpwriter.start(db, context="fork")
    with mpwriter.start(db, context="fork") as writer:  # once that user lets go
        assert writer.execute("INSERT INTO items(seq) VALUES (1)").rowcount == 1


def _hold_the_wal_write_lock(db: Path) -> str:
    """Take a read lock on the byte of the -shm file that SQLite's WAL writer locks."""
    fd = os.open(f"{db}-shm", os.O_RDONLY)  # kept open until the child exits
    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 120)  # WAL_WRITE_LOCK, sqlite3.c
    return "held"


@as_root
def test_a_user_who_may_read_the_database_can_stall_its_writes(shared_dir: Path) -> None:
    # The same limit, from SQLite's side: its -shm file has the database's
    # mode, and a read lock on it keeps the writer from writing.
    db = shared_dir / "app.db"
    with mpwriter.start(db, init=SCHEMA, context="fork") as writer:
        os.chmod(db, 0o644)
        os.chmod(f"{db}-shm", 0o644)
        with as_nobody(lambda: _hold_the_wal_write_lock(db)) as outcome:
            assert outcome == "held"
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                writer.execute("INSERT INTO items(seq) VALUES (1)", timeout=1.0)
        assert writer.execute("INSERT INTO items(seq) VALUES (2)").rowcount == 1


@as_root
def test_a_lock_file_owned_by_another_user_is_refused(shared_dir: Path) -> None:
    db = shared_dir / "app.db"
    lock = Path(f"{db}{LOCK_SUFFIX}")
    lock.touch(mode=0o600)
    os.chown(lock, NOBODY, NOBODY)  # planted: its owner could flock or change it
    with pytest.raises(mpwriter.UntrustedFile, match=f"belongs to uid {NOBODY}") as raised:
        mpwriter.start(db, context="fork")
    assert isinstance(raised.value, PermissionError)
    assert str(lock) in str(raised.value)
    assert not db.exists()  # nothing was started or created
    lock.unlink()
    with mpwriter.start(db, init=SCHEMA, context="fork") as writer:
        assert writer.execute("INSERT INTO items(seq) VALUES (1)").rowcount == 1


def test_a_symlink_planted_as_the_lock_file_is_not_followed(db_path: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    os.chmod(victim, 0o644)
    lock = Path(f"{db_path}{LOCK_SUFFIX}")
    lock.symlink_to(victim)
    with pytest.raises(mpwriter.UntrustedFile, match="symbolic link"):
        mpwriter.start(db_path, context="fork")
    assert victim.read_text() == "untouched"
    assert victim.stat().st_mode & 0o777 == 0o644
    assert not db_path.exists()


@as_root
def test_a_snapshot_planted_by_another_user_is_replaced(shared_dir: Path) -> None:
    db = shared_dir / "app.db"
    sqlite3.connect(db).close()
    snapshot = Path(f"{db}{SNAPSHOT_SUFFIX}")
    snapshot.write_text('{"format": 1, "pid": 1, "forged": true}')
    os.chown(snapshot, NOBODY, NOBODY)
    with mpwriter.start(db, init=SCHEMA, context="fork") as writer:
        writer.stats()  # served after the writer's first snapshot
        info = snapshot.lstat()
        assert info.st_uid == os.geteuid()
        assert info.st_mode & 0o022 == 0
        assert "forged" not in snapshot.read_text()
