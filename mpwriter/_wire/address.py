"""Whether a database is a server or a file: the one rule every part applies.

`start()`, the writer, `reader()`, the gunicorn hooks, the stats publisher
and the command line all ask this of the same string, so that none of them
takes a file for a server or a server for a file. libpq recognizes a
connection URI by its scheme, ``postgresql://`` or ``postgres://``; anything
else is a file path, even one containing ``://`` (``x://y.db`` is the file
``y.db`` in the directory ``x:``).
"""

from __future__ import annotations

SERVER_SCHEMES = ("postgresql://", "postgres://")


def is_server_url(database: str) -> bool:
    """True if ``database`` names a PostgreSQL server, False for a SQLite file path."""
    return database.startswith(SERVER_SCHEMES)
