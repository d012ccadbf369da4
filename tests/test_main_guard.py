"""A script without `if __name__ == "__main__":` gets an error naming the guard.

Under spawn and forkserver, children re-run the main module's top level. A
`start()` there is refused with `MissingMainGuard` (a `RuntimeError`) instead
of starting a second writer that fails as `WriterAlreadyRunning`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mpwriter

UNGUARDED = """
import concurrent.futures, multiprocessing, sys
import mpwriter

def handle(i):
    mpwriter.get_writer().execute("INSERT OR IGNORE INTO t(x) VALUES (?)", (i,))

context = multiprocessing.get_context(sys.argv[1])
writer = mpwriter.start("app.db", init="CREATE TABLE IF NOT EXISTS t(x PRIMARY KEY)")
with concurrent.futures.ProcessPoolExecutor(
    2, mp_context=context, initializer=mpwriter.attach, initargs=(writer,)
) as pool:
    list(pool.map(handle, range(10)))
writer.close()
"""

# No pool at all: the writer's own supervisor process, started with spawn or
# forkserver, re-runs the main module too.
UNGUARDED_WRITER_ONLY = """
import sys
import mpwriter

with mpwriter.start("app.db", init="CREATE TABLE IF NOT EXISTS t(x)", context=sys.argv[1]) as w:
    w.execute("INSERT INTO t(x) VALUES (1)")
"""

# A task that starts a writer of its own, after its process has bootstrapped, is
# legitimate: only a start() during the main module's re-import is refused.
START_IN_A_TASK = """
import concurrent.futures, multiprocessing, os, sys
import mpwriter

def own_writer(i):
    with mpwriter.start(f"child{i}.db", init="CREATE TABLE IF NOT EXISTS t(x)") as w:
        return w.execute("INSERT INTO t(x) VALUES (?)", (i,)).rowcount

if __name__ == "__main__":
    context = multiprocessing.get_context(sys.argv[1])
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        print(sum(pool.map(own_writer, range(2))))
"""


def run_script(tmp_path: Path, source: str, method: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(source)
    return subprocess.run(
        [sys.executable, str(script), method],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_start_in_the_reimported_main_module_names_the_missing_guard(
    tmp_path: Path, method: str
) -> None:
    result = run_script(tmp_path, UNGUARDED, method)
    assert result.returncode != 0
    assert "MissingMainGuard" in result.stderr
    assert 'if __name__ == "__main__":' in result.stderr
    assert "WriterAlreadyRunning" not in result.stderr


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_an_unguarded_start_with_spawn_or_forkserver_names_the_missing_guard(
    tmp_path: Path, method: str
) -> None:
    result = run_script(tmp_path, UNGUARDED_WRITER_ONLY, method)
    assert result.returncode != 0
    assert "MissingMainGuard" in result.stderr
    # The owner's own error, the last the user reads, points there too.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mpwriter._errors.WriterCrashed"), last
    assert 'if __name__ == "__main__":' in last


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_task_may_start_a_writer_of_its_own(tmp_path: Path, method: str) -> None:
    result = run_script(tmp_path, START_IN_A_TASK, method)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"


def test_missing_main_guard_is_a_runtime_error() -> None:
    assert issubclass(mpwriter.MissingMainGuard, RuntimeError)
    assert issubclass(mpwriter.MissingMainGuard, mpwriter.Error)
