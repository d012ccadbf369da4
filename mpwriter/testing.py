"""The one fault-injection seam of mpwriter, for its tests and tools.

Tests must not patch private names: where a test needs a fault that the
public API cannot cause (a collector that dies, a side socket that stays
full, a writer that may not hand payloads over), production code consults
`faults` at one documented point, and the test switches that point on with
`inject`::

    from mpwriter import testing

    with testing.inject(hand_over=False):
        ...  # this process sends bulk requests as frames

Every field of `Faults` is off by default. The hooks are plain attributes of
one module-level object: reading one costs an attribute lookup, so a hook is
consulted only where a rare event happens (a slot is created, a payload is
handed over), never per frame. They are process-local: a process forked while
a hook is on inherits it; a spawned or forkserver child starts with defaults.

This module imports nothing from mpwriter, so both sides may consult it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass
class Faults:
    """The injectable faults; each field says where it is consulted."""

    # Caller side (mpwriter._caller.handle): whether a bulk request may be
    # handed over as a file; False sends it as frames, as on a system
    # without memfd.
    hand_over: bool = True
    # Writer side (mpwriter._writer.engine.open_engine): when set, the writer
    # process serves with the engine this returns instead of opening the
    # database -- ``engine(counters)``, where ``counters`` is the writer's
    # stats counters object. A forked writer inherits it (start with
    # context="fork"); tools/bench_insert.py's echo engine uses it to measure
    # the transport alone.
    engine: Callable[[Any], Any] | None = None
    # Writer side (mpwriter._writer.sqlite, before a statement that runs
    # alone, such as VACUUM): seconds the writer sleeps first, standing in for
    # a long VACUUM. A forked writer inherits it (start with context="fork").
    solo_delay: float = 0.0
    # Writer side (mpwriter._writer.loop, when the writer process starts):
    # the bound, in bytes, on bulk payloads handed over and waiting for their
    # frame (256 MiB by default), so that a test reaches it with small ones.
    # A forked writer inherits it (start with context="fork").
    handed_over_bytes_max: int | None = None

    # Caller side (mpwriter._caller.futures): the thread that resolves
    # submit() futures raises at its next step, as a bug there would; its
    # futures must then fail, not hang, and the next submit() starts a new one.
    collector_fails: bool = False

    # Caller side (mpwriter._caller.calls.reregister): called in the caller
    # just before it registers a new pipe after its writer died, and just
    # after the registration was sent; a test forces an interleaving with
    # the successor writer here.
    before_reregister: Callable[[], None] | None = None
    after_reregister: Callable[[], None] | None = None

    # Writer side (mpwriter._writer.sqlite, when the engine opens): called in
    # the writer with the text of each of its own transaction statements
    # (BEGIN, SAVEPOINT, RELEASE, ROLLBACK TO, COMMIT) just before it runs;
    # what it raises, that statement raises -- as a failing disk would make
    # it (``sqlite3.OperationalError("disk I/O error")``). A forked writer
    # inherits it (start with context="fork").
    writer_statement: Callable[[str], None] | None = None


faults = Faults()


@contextlib.contextmanager
def inject(**changes: Any) -> Iterator[Faults]:
    """Set the named fields of `faults` for the duration of the block.

    Raises `TypeError` for a name that is not a field, so a renamed hook
    fails loudly instead of silently injecting nothing.
    """
    known = {field.name for field in dataclasses.fields(Faults)}
    unknown = set(changes) - known
    if unknown:
        raise TypeError(f"no such fault: {', '.join(sorted(unknown))}")
    saved = {name: getattr(faults, name) for name in changes}
    for name, value in changes.items():
        setattr(faults, name, value)
    try:
        yield faults
    finally:
        for name, value in saved.items():
            setattr(faults, name, value)


def shared_state(writer: Any) -> Any:
    """The state ``writer`` shares with its supervisor and its writer process.

    For tools that must know the current writer's pid (``writer_pid``) or
    the restart count (``restarts``) without sending a request: a `stats()`
    call from a process whose pooled reply pipe belonged to a dead writer
    takes a restart path of its own. Read its fields; never set them (their
    meaning: mpwriter/_wire/state.py).
    """
    return writer._link.pool.state


def frame_key(writer: Any) -> int:
    """The key of ``writer``'s request stream (`mpwriter._wire.frames`).

    For tests and tools that write hand-made frames to the request pipe: the
    writer skips a frame whose header was not keyed with it, as it skips the
    bytes of a caller's payload that happen to look like a frame.
    """
    key: int = writer._link.pool.frame_key
    return key
