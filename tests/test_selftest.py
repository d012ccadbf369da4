"""``python -m mpwriter.selftest`` reports what it measured and checked, on each engine.

- its rate covers the writes only: the clients start writing once all are
  ready, so spawn's start-up of the client processes is not counted;
- the text shows the figures of its ``--json`` (requests per commit);
- on PostgreSQL it names the server, not SQLite, and claims no integrity_check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def selftest(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mpwriter.selftest", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    return result, time.monotonic() - began


def test_the_rate_counts_the_writes_not_the_start_of_spawned_clients() -> None:
    result, wall = selftest("--clients", "8", "--writes", "5", "--context", "spawn", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    figures: dict[str, Any] = json.loads(result.stdout)
    assert figures["ok"]
    assert figures["acknowledged"] == 40
    # Starting 8 spawned interpreters takes most of the run; 40 writes do not.
    assert figures["seconds"] < wall / 2, (figures["seconds"], wall)
    assert figures["writes_per_second"] == figures["acknowledged"] / figures["seconds"]


def test_the_json_and_the_text_give_the_same_group_commit_figures() -> None:
    result, _ = selftest("--clients", "4", "--writes", "10", "--json")
    figures: dict[str, Any] = json.loads(result.stdout)
    commits = figures["group_commit"]
    assert commits["requests"] == figures["acknowledged"] == figures["writer"]["requests"]
    assert commits["commits"] == figures["writer"]["commits"]
    assert commits["requests_per_commit"] == commits["requests"] / commits["commits"]
    assert figures["checks"]["integrity_check ok"]

    result, _ = selftest("--clients", "4", "--writes", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    line = re.search(
        r"group commit: (\d+) requests in (\d+) commits, ([\d.]+) requests per commit",
        result.stdout,
    )
    assert line is not None, result.stdout
    requests, commits_made, per_commit = int(line[1]), int(line[2]), float(line[3])
    assert requests == 40
    assert per_commit == round(requests / commits_made, 1)
    assert "SQLite" in result.stdout.splitlines()[0]
    assert "[ok] integrity_check ok" in result.stdout


def test_on_postgresql_it_names_the_server_and_claims_no_integrity_check(pg_url: str) -> None:
    result, _ = selftest("--clients", "4", "--writes", "10", "--database", pg_url)
    assert result.returncode == 0, result.stdout + result.stderr
    header = result.stdout.splitlines()[0]
    assert "PostgreSQL" in header
    assert "SQLite" not in header
    assert "integrity_check" not in result.stdout
    assert "database is locked" not in result.stdout
    assert "PASSED" in result.stdout

    result, _ = selftest("--clients", "4", "--writes", "10", "--database", pg_url, "--json")
    figures: dict[str, Any] = json.loads(result.stdout)
    assert figures["ok"]
    assert figures["integrity"] is None
    assert "integrity_check ok" not in figures["checks"]
