"""The sample systemd unit of docs/deployment.md passes ``systemd-analyze verify``.

Its interpreter, /srv/app/venv/bin/python, does not exist here (verify checks
that ExecStart's program is executable): this interpreter stands in for it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
UNIT = re.compile(r"```ini\n(# /etc/systemd/system/(\S+)\n.*?)```", re.S)


def test_the_deployment_page_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package)")
    found = UNIT.search(PAGE.read_text())
    assert found, "docs/deployment.md has no ```ini block naming /etc/systemd/system/..."
    text, name = found.groups()
    assert "/srv/app/venv/bin/python -m mpwriter serve" in text
    unit = tmp_path / name
    unit.write_text(text.replace("/srv/app/venv/bin/python", sys.executable))
    result = subprocess.run(
        [verify, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
