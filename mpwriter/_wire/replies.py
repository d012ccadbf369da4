"""Replies as callers receive them: reassembly, decoding, and the errors of waiting.

Shared by the synchronous path (`_client.py`), futures (`_futures.py`) and
asyncio (`_aio.py`).
"""

from __future__ import annotations

import pickle
from typing import Any, NamedTuple

from .._errors import Error, QueueFull, RemoteTraceback, Timeout, portable
from .frames import PICKLED, REPLY_HEADER_SIZE, Status, decode_reply_header, decode_wrote


class Result(NamedTuple):
    """What a write returned.

    ``rows`` holds the rows a statement produced (``RETURNING``, or a query);
    ``rowcount`` and ``lastrowid`` are those of `sqlite3.Cursor`. ``columns``
    names the columns of ``rows``, and is None when no rows came back.
    """

    rowcount: int
    lastrowid: int | None
    rows: list[tuple[Any, ...]]
    # Last and defaulted: a reply without rows is a 3-tuple, Result(*value).
    columns: tuple[str, ...] | None = None

    @property
    def description(self) -> tuple[tuple[str, None, None, None, None, None, None], ...] | None:
        """The columns as `sqlite3.Cursor.description` gives them: 7-tuples,
        the name first and the rest None; None when no rows came back."""
        if self.columns is None:
            return None
        return tuple((name, None, None, None, None, None, None) for name in self.columns)

    def dicts(self) -> list[dict[str, Any]]:
        """The rows as dicts keyed by column name (a repeated name keeps its last value)."""
        columns = self.columns or ()
        return [dict(zip(columns, row, strict=True)) for row in self.rows]


class Incoming:
    """Collects the reply to ``request_id`` from the chunks read off its pipe.

    Raises `Error` as soon as the header shows a reply to another request:
    the pipe carries something this request cannot account for, and the
    caller retires it.
    """

    __slots__ = ("_buffer", "_needed", "_request_id")

    def __init__(self, request_id: int) -> None:
        self._buffer = b""
        self._needed = 0  # the whole reply's size, once its header is in
        self._request_id = request_id

    @property
    def started(self) -> bool:
        return bool(self._buffer)

    def take(self, chunk: bytes) -> bytes | None:
        # Usually the whole reply is the first chunk: no copy then.
        buffer = self._buffer = self._buffer + chunk if self._buffer else chunk
        if not self._needed and len(buffer) >= REPLY_HEADER_SIZE:
            length, replied_to = decode_reply_header(buffer)
            if replied_to != self._request_id:
                raise Error(
                    f"a reply to request {replied_to} arrived for request {self._request_id};"
                    " the outcome is unknown"
                )
            self._needed = REPLY_HEADER_SIZE + length
        return buffer if self._needed and len(buffer) >= self._needed else None


def queue_full() -> QueueFull:
    return QueueFull("the request queue stayed full for the whole timeout; not sent")


def no_reply() -> Timeout:
    return Timeout("no reply from the writer within the timeout; the outcome is unknown")


def unpack_reply(reply: bytes) -> Any:
    """The value of a whole reply (from `Incoming`), or raise the error it carries."""
    if reply[REPLY_HEADER_SIZE] != PICKLED:
        return decode_wrote(reply)
    status, value = pickle.loads(memoryview(reply)[REPLY_HEADER_SIZE:])
    if status == Status.OK:
        return value
    exc, tb = value
    # A driver's SQL error also becomes an mpwriter.DatabaseError (see _errors).
    exc = portable(exc)
    exc.__cause__ = RemoteTraceback(tb)
    raise exc


def millis(seconds: float) -> int:
    return max(0, int(seconds * 1000) + 1)
