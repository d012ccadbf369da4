"""Every Python example of the README and of docs/*.md runs as a script, as a reader would run it.

Sybil collects the ```python blocks of those Markdown files. Each block is
written to a file in a temporary directory kept for its page (so a tutorial's
later steps see the database and the modules its earlier steps made) and run
with this interpreter, twice: a reader runs an example again, and it must
not fail then (a UNIQUE constraint, a table that already exists). A block is a
complete script run as ``__main__`` -- the ``if __name__ == "__main__":``
guard and process pools under spawn behave as they do for the reader -- and
its first line may name its file (``# app.py``) so that later blocks import it.

Directives, in HTML comments (invisible on the rendered page):

- ``<!-- skip: next "why" -->`` before a block that cannot run here (it needs
  a server, a gunicorn, or it is a fragment): reported as skipped, with why.
- ``<!-- output -->`` before a ```text block: what the previous block must
  print, on each run; a ``...`` stands for any text (doctest's ELLIPSIS).
"""

from __future__ import annotations

import doctest
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sybil import Document, Example, Region, Sybil
from sybil.parsers.markdown import CodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent
RUNS = 2
FILE_NAME = re.compile(r"#\s*([\w.-]+\.py)\b")
OUTPUT = re.compile(r"<!-- output -->\n+```text\n(.*?)```", re.S)


def run_script(example: Example) -> None:
    directory = Path(example.namespace["directory"])
    source: str = example.parsed
    named = FILE_NAME.match(source)
    script = directory / (named.group(1) if named else "example.py")
    script.write_text(source)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    outputs = []
    for run in range(1, RUNS + 1):
        result = subprocess.run(
            [sys.executable, script.name],
            cwd=directory,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"run {run} of the example exited with {result.returncode}:\n{result.stderr}"
            )
        outputs.append(result.stdout)
    example.namespace["outputs"] = outputs


def check_output(example: Example) -> None:
    want: str = example.parsed
    checker = doctest.OutputChecker()
    outputs = example.namespace.pop("outputs", None)
    if outputs is None:
        raise AssertionError("no output to check: the example before it did not run")
    for run, got in enumerate(outputs, 1):
        if not checker.check_output(want, got, doctest.ELLIPSIS):
            raise AssertionError(f"run {run} printed:\n{got}\nnot what the page shows:\n{want}")


def parse_outputs(document: Document) -> Iterator[Region]:
    for match in OUTPUT.finditer(document.text):
        yield Region(match.start(), match.end(), match.group(1), check_output)


def make_directory(namespace: dict[str, Any]) -> None:
    namespace["directory"] = tempfile.mkdtemp(prefix="mpwriter-docs-")


def remove_directory(namespace: dict[str, Any]) -> None:
    shutil.rmtree(namespace["directory"])


pytest_collect_file = Sybil(
    parsers=[
        CodeBlockParser(language="python", evaluator=run_script),
        parse_outputs,
        SkipParser(),
    ],
    patterns=["README.md", "docs/*.md"],
    setup=make_directory,
    teardown=remove_directory,
).pytest()
