"""``python -m mpwriter serve PATH``: a writer as a service, in the foreground.

For systemd or a container: this process owns the writer (`start`), and the
app's processes reach it with `mpwriter.connect`. It logs to stderr; SIGTERM
or SIGINT closes the writer (everything queued is served and committed,
then the WAL is checkpointed) and exits 0. It exits non-zero with one line
on stderr when the writer cannot start, and with status 1 if the writer's
supervisor ends without being asked to.

No thread: the main thread waits on the signal wake-up pipe and the
supervisor's sentinel together.

``--init-function MODULE:FUNCTION`` names the writer's ``init`` as a
function: each writer process imports it when it starts (and again after a
restart) and calls it with its connection, so the service process itself
imports nothing of the app.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from .owner import start

log = logging.getLogger("mpwriter")

EXIT_CANNOT_START = 1
# The options' defaults are start()'s own: declared there once.
_DEFAULT = {name: p.default for name, p in inspect.signature(start).parameters.items()}
_FUNCTION_SPEC = re.compile(r"\w+(\.\w+)*:\w+")


@dataclass(frozen=True)
class InitFunction:
    """A writer's ``init`` named ``MODULE:FUNCTION``: imported in the writer, called there.

    Picklable by name, so the function is imported by the writer process
    that runs it, never by the process that starts the writer. Raises
    ImportError naming ``spec`` when the module or the function is missing,
    and whatever the function raises.
    """

    spec: str

    def __call__(self, conn: Any) -> object:
        module_name, _, name = self.spec.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as exc:
            raise ImportError(f"--init-function {self.spec}: {exc}") from exc
        return function(conn)


def _function_spec(text: str) -> str:
    if not _FUNCTION_SPEC.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not MODULE:FUNCTION (e.g. mpwriter.django:writer_init)"
        )
    return text


def add_serve_command(commands: Any) -> None:
    """Add ``serve`` to the command line's subparsers (``commands``)."""
    serve = commands.add_parser(
        "serve",
        help="run the writer of a database in the foreground, as a service",
        description="Run the writer of the SQLite file PATH in the foreground: the app's"
        " processes write through it with mpwriter.connect(PATH). Logs to stderr;"
        " SIGTERM or SIGINT serves what is queued, then exits 0.",
    )
    serve.add_argument("path", metavar="PATH", help="the database file (or a PostgreSQL URL)")
    init = serve.add_mutually_exclusive_group()
    init.add_argument("--init", metavar="FILE", help="an SQL script each writer runs first")
    init.add_argument(
        "--init-function",
        metavar="MODULE:FUNCTION",
        type=_function_spec,
        help="a function each writer imports and calls with its connection first"
        " (e.g. mpwriter.django:writer_init)",
    )
    serve.add_argument(
        "--synchronous",
        choices=("NORMAL", "FULL", "EXTRA"),
        type=str.upper,
        default=_DEFAULT["synchronous"],
    )
    serve.add_argument("--max-batch", type=int, default=_DEFAULT["max_batch"], metavar="N")
    serve.add_argument("--timeout", type=float, default=_DEFAULT["timeout"], metavar="SECONDS",
                       help="the default per-call timeout of connected handles")  # fmt: skip
    serve.add_argument("--queue-size", type=int, default=_DEFAULT["queue_size"], metavar="BYTES")
    serve.add_argument(
        "--execution-limit", type=float, default=_DEFAULT["execution_limit"], metavar="SECONDS"
    )
    serve.add_argument(
        "--slow-request", type=float, default=_DEFAULT["slow_request"], metavar="SECONDS"
    )
    serve.add_argument("--max-restarts", type=int, default=_DEFAULT["max_restarts"], metavar="N")
    serve.add_argument(
        "--start-timeout", type=float, default=_DEFAULT["start_timeout"], metavar="SECONDS"
    )
    serve.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="how long a stop may take before the writer is killed")  # fmt: skip
    serve.add_argument("--endpoint", metavar="SOCKET",
                       help="where to listen (default: PATH.mpwriter.sock)")  # fmt: skip
    serve.add_argument("--allow-group", metavar="GROUP",
                       help="a group whose members may connect too")  # fmt: skip
    serve.add_argument(
        "--isolation",
        choices=("read committed", "repeatable read", "serializable"),
        default=_DEFAULT["isolation"],
        help="PostgreSQL only",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; return the process's exit status."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    got: list[int] = []

    def note(signum: int, _frame: object) -> None:
        got.append(signum)

    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, note)
    try:
        try:
            writer = start(args.path, context="fork", **_start_options(args))
        except Exception as exc:
            # Whatever stopped the start, the init function's own errors
            # included (any class): the service's contract is one line
            # saying why, then exit status 1.
            print(f"mpwriter serve: cannot start the writer of {args.path}: {exc}", file=sys.stderr)
            return EXIT_CANNOT_START
        owner: Any = writer._owner  # this process's grip on its supervisor
        assert owner is not None
        log.info("mpwriter: serving %s (supervisor pid %s)", writer.path, owner.supervisor.pid)
        while not got:
            ready = wait([wake_r, owner.supervisor.sentinel])
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            if owner.supervisor.sentinel in ready and not got:
                log.error("mpwriter: the writer's supervisor ended; exiting")
                writer.close(timeout=args.drain_timeout)
                return 1
        log.info("mpwriter: got %s; serving what is queued, then exiting",
                 signal.Signals(got[0]).name)  # fmt: skip
        writer.close(timeout=args.drain_timeout)
        log.info("mpwriter: the writer of %s stopped", writer.path)
        return 0
    finally:
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)


def _start_options(args: argparse.Namespace) -> dict[str, Any]:
    init: str | InitFunction | None = None
    if args.init is not None:
        with open(args.init) as script:
            init = script.read()
    elif args.init_function is not None:
        init = InitFunction(args.init_function)
    return {
        "init": init,
        "synchronous": args.synchronous,
        "max_batch": args.max_batch,
        "timeout": args.timeout,
        "queue_size": args.queue_size,
        "execution_limit": args.execution_limit,
        "slow_request": args.slow_request,
        "max_restarts": args.max_restarts,
        "start_timeout": args.start_timeout,
        "endpoint": args.endpoint,
        "allow_group": (
            int(args.allow_group) if (args.allow_group or "").isdigit() else args.allow_group
        ),
        "isolation": args.isolation,
    }
