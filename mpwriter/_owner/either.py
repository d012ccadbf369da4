"""`start_or_connect`: use the writer serving a file, or start one if none does.

Race-free through the database's lock file, which admits one writer: of
several processes that find no writer at once, each tries `start()`; the
one whose writer takes the lock serves, the others get `WriterAlreadyRunning`
from their own writer (which exits) and connect to the winner's endpoint,
which opens once its writer is ready.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .._caller.connect import connect
from .._caller.handle import Writer
from .._errors import UntrustedFile, WriterAlreadyRunning, WriterUnavailable
from .owner import start

# Between the winner's writer taking the lock and its endpoint opening, a
# loser finds neither a writer it may start nor one it can connect to.
_RETRY_PAUSE = 0.05


def start_or_connect(path: str | os.PathLike[str], **start_options: Any) -> Writer:
    """A handle on the writer serving ``path``: connected if one serves, else started here.

    Takes `start()`'s options; they apply only if this process starts the
    writer (``timeout``, if given, is the handle's default either way; the
    ``endpoint`` is where both look). When several processes call this at
    once, exactly one starts the writer and the others connect to it. The
    handle returned by `start()` stops the writer when its process closes it
    or exits; see `Writer.close`.

    Raises what `start()` raises when it fails for another reason than a
    writer already serving (the database cannot be opened, ``init`` fails,
    another user's socket at the endpoint that this user may not replace:
    `UntrustedFile`), and `WriterUnavailable` if, within ``start_timeout``
    (30 s), neither starting nor connecting succeeds.
    """
    endpoint = start_options.get("endpoint")
    timeout = start_options.get("timeout")
    deadline = time.monotonic() + start_options.get("start_timeout", 30.0)
    while True:
        try:
            return connect(path, timeout=timeout, endpoint=endpoint)
        except (WriterUnavailable, UntrustedFile) as exc:
            # UntrustedFile: another user's socket stands at the endpoint. A
            # SQLite writer started here replaces it once it holds the file's
            # lock (or says it may not); a real writer would have answered.
            unavailable = exc
        try:
            return start(path, **start_options)
        except WriterAlreadyRunning as exc:
            running = exc  # lost the race: the winner's endpoint opens once it is ready
        if time.monotonic() > deadline:
            raise WriterUnavailable(
                f"could neither start nor connect to a writer for {os.fspath(path)!r}:"
                f" {running}; {unavailable}"
            )
        # sleep-ok: nothing signals that another process's endpoint has opened
        time.sleep(_RETRY_PAUSE)
