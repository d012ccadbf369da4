"""Replies as callers receive them: reassembly, decoding, and the errors of waiting.

Shared by the synchronous path (`_client.py`), futures (`_futures.py`) and
asyncio (`_aio.py`).
"""

from __future__ import annotations

import pickle
from typing import Any, NamedTuple

from ._errors import Error, QueueFull, RemoteTraceback, Timeout
from ._wire import REPLY_HEADER_SIZE, Status, decode_reply_header, reply_size


class Result(NamedTuple):
    """What a write returned.

    ``rows`` holds the rows a statement produced (``RETURNING``, or a query);
    ``rowcount`` and ``lastrowid`` are those of `sqlite3.Cursor`.
    """

    rowcount: int
    lastrowid: int | None
    rows: list[tuple[Any, ...]]


class Incoming:
    """Collects one reply from the chunks read off its pipe."""

    __slots__ = ("_buffer", "_needed")

    def __init__(self) -> None:
        self._buffer = b""
        self._needed = REPLY_HEADER_SIZE

    @property
    def started(self) -> bool:
        return bool(self._buffer)

    def take(self, chunk: bytes) -> bytes | None:
        # Usually the whole reply is the first chunk: no copy then.
        buffer = self._buffer = self._buffer + chunk if self._buffer else chunk
        if self._needed == REPLY_HEADER_SIZE and len(buffer) >= REPLY_HEADER_SIZE:
            self._needed = reply_size(buffer)
        return buffer if len(buffer) >= self._needed else None


def queue_full() -> QueueFull:
    return QueueFull("the request queue stayed full for the whole timeout; not sent")


def no_reply() -> Timeout:
    return Timeout("no reply from the writer within the timeout; the outcome is unknown")


def unpack_reply(payload: bytes, request_id: int) -> Any:
    length, replied_to = decode_reply_header(payload[:REPLY_HEADER_SIZE])
    if replied_to != request_id:
        raise Error(f"reply to request {replied_to} arrived for request {request_id}")
    status, value = pickle.loads(payload[REPLY_HEADER_SIZE : REPLY_HEADER_SIZE + length])
    if status == Status.OK:
        return value
    exc, tb = value
    exc.__cause__ = RemoteTraceback(tb)
    raise exc


def millis(seconds: float) -> int:
    return max(0, int(seconds * 1000) + 1)
