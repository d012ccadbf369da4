"""Every figure declared in `mpwriter.Stats` reaches every view of the figures.

A figure is declared once, in `mpwriter.Stats`, with its kind and help text
as ``Annotated`` metadata; `stats()`, `mpwriter.prometheus_text` and the
command line's text are derived from that declaration. These tests read the
declarations and check each figure in each view, so a figure added to `Stats`
and missing from a view fails here.

The command line is given figures with a distinct value for each figure: a
snapshot written where a writer publishes its own (``app.db.mpwriter-stats.json``,
the file the command reads, described in docs/monitoring.md), by this test
process holding the database's writer lock as a writer would.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_origin, get_type_hints, is_typeddict

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mpwriter
from conftest import Gate

SNAPSHOT_FORMAT = 1


def declared(typed_dict: Any) -> dict[str, Any]:
    return get_type_hints(typed_dict, include_extras=True)


def figure_of(name: str) -> Any:
    (figure,) = declared(mpwriter.Stats)[name].__metadata__
    return figure


def distinct_figures() -> dict[str, Any]:
    """A `Stats` whose every number is different from every other, and not 0 or 1."""
    numbers = iter(range(7001, 8000))

    def value(hint: Any, name: str) -> Any:
        if hasattr(hint, "__metadata__"):  # Annotated[type, ...]
            hint = hint.__origin__
        plain = get_origin(hint) or hint
        if is_typeddict(plain):
            return {key: value(inner, key) for key, inner in declared(plain).items()}
        if plain is dict:
            return {f"Error{next(numbers)}": next(numbers)}
        if plain is str:
            return f"{name}{next(numbers)}"
        if plain is float:
            return float(next(numbers))
        assert plain is int, (name, hint)
        return next(numbers)

    return {name: value(hint, name) for name, hint in declared(mpwriter.Stats).items()}


def leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for key, inner in value.items():
            if key.startswith("Error"):
                yield key
            yield from leaves(inner)
    else:
        yield value


# That stats() returns every declared figure, on both engines: test_engines.py.


def test_every_figure_declares_its_kind_and_help_text() -> None:
    names = list(declared(mpwriter.Stats))
    assert names == list(mpwriter.Stats.__annotations__)
    for name in names:
        figure = figure_of(name)
        assert figure.kind in {"counter", "gauge", "summary", "info", "part"}, name
        assert figure.help.strip(), name
    assert figure_of("requests").kind == "counter"
    assert figure_of("queue_depth").kind == "gauge"
    assert figure_of("latency_ms").kind == "summary"


def test_every_figure_is_in_the_prometheus_text() -> None:
    stats = distinct_figures()
    text = mpwriter.prometheus_text(stats)
    families = list(text_string_to_metric_families(text))
    values = {float(s.value) for f in families for s in f.samples}
    labels = {label for f in families for s in f.samples for label in s.labels.values()}
    for name in stats:
        figure = figure_of(name)
        for leaf in leaves(stats[name]):
            if isinstance(leaf, str) or figure.kind == "info":  # a label
                assert str(leaf) in labels, (name, leaf)
            elif figure.unit == "ms":
                assert any(v == pytest.approx(leaf / 1000) for v in values), (name, leaf)
            else:
                assert leaf in values, (name, leaf)
    # Every family has the help text of a declared figure.
    helps = {figure_of(name).help for name in stats}
    for family in families:
        assert any(help_text in family.documentation for help_text in helps) or (
            family.type == "summary"
        ), family.name


@pytest.fixture
def fabricated(db_path: Path) -> Iterator[dict[str, Any]]:
    """Distinct figures published for ``db_path``, this process holding its writer lock."""
    stats = distinct_figures()
    snapshot = {
        "format": SNAPSHOT_FORMAT,
        "database": str(db_path),
        "pid": stats["pid"],
        "state": stats["state"],
        "published_at": time.time(),
        "monotonic": time.monotonic(),
        "stats": stats,
    }
    db_path.touch()  # stats trusts figures written by the database's owner only
    with open(f"{db_path}.mpwriter.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stats["pid"] = snapshot["pid"] = os.getpid()
        Path(f"{db_path}.mpwriter-stats.json").write_text(json.dumps(snapshot))
        yield stats


def run_stats(db_path: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mpwriter", "stats", str(db_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_figure_is_in_the_command_lines_text(
    db_path: Path, fabricated: dict[str, Any]
) -> None:
    text = run_stats(db_path)
    count = fabricated["latency_count"]
    for name, value in fabricated.items():
        if name == "latency_sum_seconds":  # shown as the mean of all requests timed
            for seconds in value.values():
                assert f"{1000 * seconds / count:.2f}" in text, (name, text)
            continue
        for leaf in leaves(value):
            if name == "post_errors_by_class" and isinstance(leaf, str):
                continue  # shown as their sum
            assert str(int(leaf) if isinstance(leaf, float) else leaf) in text, (name, leaf, text)
    assert run_stats(db_path, "--prometheus") == mpwriter.prometheus_text(fabricated)
    assert json.loads(run_stats(db_path, "--json"))["stats"] == fabricated


# -- the writer's load -------------------------------------------------------------


def test_a_writer_that_served_nothing_was_never_busy(db_path: Path) -> None:
    with mpwriter.start(db_path, context="fork") as writer:
        stats = writer.stats()  # computed before this request's own batch ends
    assert stats["busy_seconds"] == 0.0
    assert stats["busy_share"] == 0.0
    assert stats["requests_per_second"] == 0.0


def test_the_busy_share_rises_while_the_writer_serves_a_long_batch(
    writer: mpwriter.Writer, gate: Gate
) -> None:
    for n in range(10):
        writer.execute("INSERT INTO items(seq) VALUES (?)", (n,))
    before = writer.stats()
    assert 0 < before["busy_seconds"] <= before["uptime"]
    assert 0 < before["busy_share"] <= 1
    assert before["requests_per_second"] > 0

    gate.hold(writer)  # returns once the writer is inside a batch
    entered = time.monotonic()
    time.sleep(0.3)  # sleep-ok: the writer must be busy for a while; nothing waits on this
    held = time.monotonic() - entered
    gate.release()
    assert gate.future.result(timeout=10) == "released"
    after = writer.stats()
    # The held batch ended within the recent window (at most the uptime):
    # at least `held` of it was busy.
    assert after["busy_seconds"] - before["busy_seconds"] >= held
    assert after["busy_share"] >= min(1.0, 0.99 * held / after["uptime"])
    assert after["busy_seconds"] <= after["uptime"]


def test_the_watch_view_shows_the_busy_share_between_two_refreshes(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    writer.stats()  # served after the writer's first snapshot
    with subprocess.Popen(
        [sys.executable, "-m", "mpwriter", "stats", str(db_path), "--watch"],
        stdout=subprocess.PIPE,
        text=True,
    ) as watch:
        assert watch.stdout is not None
        try:
            lines = []
            deadline = time.monotonic() + 15
            # The header, a reading, then readings until one has a previous
            # snapshot to measure against (the writer publishes about once a second).
            while len(lines) < 2 or lines[-1].split()[-1] == "-":
                assert select.select([watch.stdout], [], [], max(0.0, deadline - time.monotonic()))[
                    0
                ], lines
                lines.append(watch.stdout.readline())
                writer.execute("INSERT INTO items(seq) VALUES (1)")
        finally:
            watch.kill()
    assert lines[0].split()[-2:] == ["busy", "%"]
    assert lines[1].split()[-1] == "-"  # no previous reading to measure against
    assert 0 <= int(lines[-1].split()[-1]) <= 100
