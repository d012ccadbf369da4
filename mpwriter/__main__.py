"""The operator's command line: ``python -m mpwriter stats PATH``, ``... serve PATH``.

``serve`` runs a writer as a service (see `mpwriter._owner.service`).

Shows the figures of the writer serving the SQLite file PATH, from any
process that may read the database's directory, without the app's handle and
without sending the writer anything (see `mpwriter._watching`)::

    python -m mpwriter stats app.db                # figures, for people
    python -m mpwriter stats app.db --json         # the same, for machines
    python -m mpwriter stats app.db --prometheus   # Prometheus text (node_exporter textfile)
    python -m mpwriter stats app.db --watch        # a line a second until Ctrl-C

Exit status: 0 with figures; 1 when no writer serves PATH; 2 for a usage
error or a database named by a URL; 3 when a writer serves PATH but its
figures cannot be read (it is starting, or the snapshot is not readable); 4
when the snapshot cannot be trusted (written by another user than the
writer's, or writable by others): its figures may be forged, and are not shown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from ._owner.service import add_serve_command, run_serve
from ._watching import WATCH_HEADER, NotWatchable, Reading, describe, read, watch_line
from .prometheus import prometheus_text

_WATCH_INTERVAL = 1.0
_HEADER_EVERY = 20  # lines, as vmstat repeats its header


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpwriter", description="Look at a running mpwriter writer."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser(
        "stats",
        help="show the figures of the writer serving a database",
        description="Show the figures of the writer serving the SQLite file PATH. Reads the"
        " snapshot the writer publishes beside it about once a second; never sends the"
        " writer anything.",
    )
    stats.add_argument("path", metavar="PATH", help="the database file, as the app names it")
    form = stats.add_mutually_exclusive_group()
    form.add_argument(
        "--json", action="store_true", help="print JSON (with --watch, one object a line)"
    )
    form.add_argument(
        "--prometheus", action="store_true", help="print Prometheus' text exposition format"
    )
    stats.add_argument(
        "--watch", action="store_true", help="print a line every second until Ctrl-C"
    )
    add_serve_command(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.watch and args.prometheus:
        parser.error("--watch does not go with --prometheus")
    try:
        if args.watch:
            return _watch(args.path, as_json=args.json)
        return _show_once(args.path, as_json=args.json, as_prometheus=args.prometheus)
    except BrokenPipeError:
        return 0  # `| head`: the reader has seen enough


def _show_once(path: str, *, as_json: bool, as_prometheus: bool) -> int:
    try:
        reading = read(path)
    except NotWatchable as exc:
        print(exc, file=sys.stderr)
        return exc.status
    if as_json:
        print(json.dumps(reading.as_json(), indent=2))
    elif as_prometheus:
        sys.stdout.write(prometheus_text(reading.stats))
    else:
        print(describe(reading))
    return 0


def _watch(path: str, *, as_json: bool) -> int:
    """Print a reading every second until Ctrl-C; a missing writer is a line, not the end."""
    previous: Reading | None = None
    printed = 0
    next_at = time.monotonic()
    try:
        while True:
            try:
                reading: Reading | None = read(path)
                problem = ""
            except NotWatchable as exc:
                reading, problem = None, str(exc)
            if as_json:
                line = json.dumps(
                    reading.as_json() if reading else {"database": path, "problem": problem}
                )
            else:
                if printed % _HEADER_EVERY == 0:
                    print(WATCH_HEADER)
                line = watch_line(reading, previous, problem)
            print(line, flush=True)
            printed += 1
            if reading is not None and (
                previous is None or reading.snapshot["monotonic"] != previous.snapshot["monotonic"]
            ):
                previous = reading
            next_at += _WATCH_INTERVAL
            # sleep-ok: the refresh interval of a live view, not synchronization
            time.sleep(max(0.0, next_at - time.monotonic()))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
