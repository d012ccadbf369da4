"""Django's SQLite backend through the one writer: ``"ENGINE": "mpwriter.django"``.

    DATABASES = {"default": {"ENGINE": "mpwriter.django", "NAME": "app.db"}}

Writes go through the writer serving NAME (`writer_for` says which), reads
outside a transaction run on a local read-only connection, and
``transaction.atomic()`` blocks are interactive transactions in the writer
(`mpwriter.Session`). See docs/django.md.
"""

from .writers import close_writer, writer_for, writer_init

__all__ = ["close_writer", "writer_for", "writer_init"]
