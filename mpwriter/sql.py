"""`native`: SQL text that reaches PostgreSQL's driver as written.

A public-facing module of its own, importing nothing from mpwriter: callers
wrap their SQL in `native`, the text crosses to the writer pickled, and the
PostgreSQL engine (`mpwriter._writer.pg_sql`) recognises the marker.
"""

from __future__ import annotations

__all__ = ["native"]


class native(str):
    """SQL for psycopg as written: no placeholder translation on PostgreSQL.

    ``writer.execute(mpwriter.native("SELECT %s::jsonb ? 'k'"), (doc,))`` sends
    the text to psycopg unchanged, so it uses psycopg's ``%s`` / ``%(name)s``
    placeholders and ``%%`` for a literal percent sign when it has parameters.
    On SQLite the text runs as it is (the marker is a plain `str` subclass).
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[type[native], tuple[str]]:
        return (native, (str(self),))
