"""The README's first example runs as written, twice in a row."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_first_example_runs_twice_and_writes_every_row(tmp_path: Path) -> None:
    example = next(block for block in python_blocks() if "ProcessPoolExecutor" in block)
    script = tmp_path / "example.py"
    script.write_text(example)
    for _run in range(2):  # a newcomer runs it again: it must not fail the second time
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "(1000,)"
