"""The docs' examples of the command line and of Prometheus text do what the page says.

conftest.py runs every Python example of the docs (twice) and checks what it
prints; these tests check what a printed comparison cannot: that the
Prometheus text parses, and that the shell commands answer a running writer."""

from __future__ import annotations

import json
import re
import select
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import mpwriter

DOCS = Path(__file__).resolve().parent.parent / "docs"


def block(language: str, containing: str) -> str:
    blocks = re.findall(
        rf"```{language}\n(.*?)```",
        "".join(page.read_text() for page in sorted(DOCS.glob("*.md"))),
        re.S,
    )
    (found,) = [b for b in blocks if containing in b]
    return str(found)


def run_python(code: str, cwd: Path) -> str:
    script = cwd / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_stats_example_prints_typed_stats_and_parsable_prometheus_text(
    tmp_path: Path,
) -> None:
    example = block("python", "prometheus_text(stats)")
    first, text = run_python(example, tmp_path).split("\n", 1)
    requests, p99 = first.split()
    assert requests == "1"
    assert float(p99) > 0
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["mpwriter_requests"].samples[0].value == 1
    assert families["mpwriter_latency_total_seconds"].type == "summary"


def test_the_command_line_examples_run_against_a_running_writer(tmp_path: Path) -> None:
    commands = [
        line.split("#")[0].strip()
        for line in block("sh", "python -m mpwriter stats").splitlines()
        if line.strip()
    ]
    assert len(commands) == 5
    with mpwriter.start(tmp_path / "app.db", context="fork") as writer:
        writer.stats()  # served after the writer's first snapshot
        for command in commands:
            argv = [sys.executable if word == "python" else word for word in shlex.split(command)]
            if "--watch" not in argv:
                result = subprocess.run(
                    argv, cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False
                )
                assert result.returncode == 0, (command, result.stderr)
                assert result.stdout, command
                continue
            with subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, text=True) as watch:
                assert watch.stdout is not None
                try:
                    # The header, then a reading; with --json, a JSON object a reading.
                    for _ in range(1 if "--json" in argv else 2):
                        assert select.select([watch.stdout], [], [], 10)[0], command
                        line = watch.stdout.readline()
                    if "--json" in argv:
                        assert json.loads(line)["state"] == "serving"
                    else:
                        assert line.split()[1] == "serving"
                    watch.send_signal(signal.SIGINT)  # Ctrl-C
                    assert watch.wait(timeout=10) == 0
                finally:
                    if watch.poll() is None:
                        watch.kill()
