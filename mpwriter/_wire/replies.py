"""Replies as callers receive them: reassembly, decoding, and the errors of waiting.

Used by the caller's request protocol (`mpwriter._caller.calls`), whichever
driver runs it.
"""

from __future__ import annotations

import marshal
import os
import pickle
from typing import Any, NamedTuple

from .._errors import Error, QueueFull, RemoteTraceback, Timeout, portable
from .frames import (
    PICKLED,
    REPLY_HEADER,
    REPLY_HEADER_SIZE,
    ROWS_TAG,
    WROTE_NO_ROWID,
    WROTE_REPLY,
    Status,
    decode_reply_header,
)

READ_SIZE = 1 << 16  # a reply pipe holds 64 KiB by default


class Result(NamedTuple):
    """What a write returned.

    ``rows`` holds the rows a statement produced (``RETURNING``, or a query);
    ``rowcount`` and ``lastrowid`` are those of `sqlite3.Cursor`. ``columns``
    names the columns of a statement that has a result set (a query, a
    ``RETURNING``), even one that produced no rows, as sqlite3 does; None
    for a statement without one.
    """

    rowcount: int
    lastrowid: int | None
    rows: list[tuple[Any, ...]]
    # Last and defaulted: a reply without rows is a 3-tuple, Result(*value).
    columns: tuple[str, ...] | None = None

    @property
    def description(self) -> tuple[tuple[str, None, None, None, None, None, None], ...] | None:
        """The columns as `sqlite3.Cursor.description` gives them: 7-tuples,
        the name first and the rest None; None for a statement without a result set."""
        if self.columns is None:
            return None
        return tuple((name, None, None, None, None, None, None) for name in self.columns)

    def dicts(self) -> list[dict[str, Any]]:
        """The rows as dicts keyed by column name (a repeated name keeps its last value)."""
        columns = self.columns or ()
        return [dict(zip(columns, row, strict=True)) for row in self.rows]


class Incoming:
    """Collects the reply to ``request_id`` off its pipe, in linear time.

    The usual reply is whole in the first read and is returned as read, with
    no copy. A longer one goes into a buffer of the size its header gives,
    filled in place (`os.readv` into the buffer's free part): each byte is
    copied once, however many reads it takes, where growing ``buffer +
    chunk`` copied it once per read. Raises `Error` as soon as the header
    shows a reply to another request: the pipe carries something this
    request cannot account for, and the caller retires it.
    """

    __slots__ = ("_buffer", "_filled", "_needed", "_request_id")

    def __init__(self, request_id: int) -> None:
        self._buffer: bytearray | None = None
        self._filled = 0
        self._needed = 0  # the whole reply's size, once its header is in
        self._request_id = request_id

    @property
    def started(self) -> bool:
        """Whether part of the reply was read (it cannot be resumed elsewhere)."""
        return self._buffer is not None

    def read(self, fd: int) -> bytes | bytearray | None:
        """Read once from the non-blocking ``fd``; the whole reply once complete.

        Raises `EOFError` when the pipe's write end is gone. (A request's
        first read is usually `read_reply`, which makes an `Incoming` only for
        a reply that does not come whole in one read.)
        """
        buffer = self._buffer
        if buffer is None:
            chunk = os.read(fd, READ_SIZE)
            if not chunk:
                raise EOFError
            return self.take(chunk)
        if not self._needed:  # a torn header: take just the rest of it
            chunk = os.read(fd, REPLY_HEADER_SIZE - self._filled)
            if not chunk:
                raise EOFError
            return self.take(chunk)
        count = os.readv(fd, [memoryview(buffer)[self._filled :]])
        if not count:
            raise EOFError
        self._filled += count
        return buffer if self._filled == self._needed else None

    def take(self, chunk: bytes) -> bytes | bytearray | None:
        """Add ``chunk`` (read by the caller); the whole reply once complete."""
        buffer = self._buffer
        if buffer is None:
            if len(chunk) >= REPLY_HEADER_SIZE and len(chunk) >= self._check_header(chunk):
                return chunk  # the usual case: the whole reply in one read
            buffer = self._buffer = bytearray(max(self._needed, REPLY_HEADER_SIZE))
        end = self._filled + len(chunk)
        buffer[self._filled : end] = chunk
        self._filled = end
        if not self._needed and end >= REPLY_HEADER_SIZE:
            needed = self._check_header(buffer)
            buffer.extend(bytes(needed - len(buffer)))
        return buffer if self._needed and self._filled >= self._needed else None

    def _check_header(self, data: bytes | bytearray) -> int:
        head = data if isinstance(data, bytes) else bytes(data[:REPLY_HEADER_SIZE])
        length, replied_to = decode_reply_header(head)
        if replied_to != self._request_id:
            raise Error(
                f"a reply to request {replied_to} arrived for request {self._request_id};"
                " the outcome is unknown"
            )
        self._needed = REPLY_HEADER_SIZE + length
        return self._needed


def as_result(value: Any) -> Result:
    """The `Result` of an EXECUTE or EXECUTEMANY reply's value.

    `unpack_reply` already gives a `Result` for a write without rows and a
    marshalled result set; a pickled reply (PostgreSQL's, or rows marshal
    refused) carries the plain tuple.
    """
    return value if value.__class__ is Result else Result(*value)


def read_reply(fd: int, request_id: int) -> bytes | Incoming:
    """Read once from the non-blocking ``fd`` for the reply to ``request_id``.

    Returns the whole reply when it came in this one read (the usual case),
    else an `Incoming` holding what was read, to go on with. Raises
    `EOFError` when the pipe's write end is gone and nothing came, and
    `Error` when the header names another request (as `Incoming` does).
    One Python call on the hot path, where a fresh `Incoming` cost three.
    """
    chunk = os.read(fd, READ_SIZE)
    size = len(chunk)
    if size >= REPLY_HEADER_SIZE:
        length, replied_to = REPLY_HEADER.unpack_from(chunk)
        if replied_to == request_id and size >= REPLY_HEADER_SIZE + length:
            return chunk
    elif not size:
        raise EOFError
    incoming = Incoming(request_id)
    incoming.take(chunk)  # never whole: the check above would have returned it
    return incoming


def queue_full() -> QueueFull:
    return QueueFull("the request queue stayed full for the whole timeout; not sent")


def no_reply() -> Timeout:
    return Timeout("no reply from the writer within the timeout; the outcome is unknown")


def unpack_reply(reply: bytes | bytearray) -> Any:
    """The value of a whole reply (from `Incoming`), or raise the error it carries.

    A write's compact reply (`frames.encode_wrote`) comes back as a `Result`
    already, ``(rowcount, lastrowid, [], None)``, and so does a result set's
    (`frames.encode_rows`), so that ``execute`` need not build a second one;
    any other value is as the writer pickled it.
    """
    tag = reply[REPLY_HEADER_SIZE]
    if tag != PICKLED:
        if tag == ROWS_TAG:
            # tuple.__new__ in C: Result(...) would run the NamedTuple's Python __new__.
            return _new_tuple(Result, marshal.loads(memoryview(reply)[REPLY_HEADER_SIZE + 1 :]))
        _, _, wrote, rowcount, lastrowid = WROTE_REPLY.unpack(reply)
        if wrote == WROTE_NO_ROWID:
            lastrowid = None
        return _new_tuple(Result, (rowcount, lastrowid, [], None))
    status, value = pickle.loads(memoryview(reply)[REPLY_HEADER_SIZE:])
    if status == Status.OK:
        return value
    exc, tb = value
    # A driver's SQL error also becomes an mpwriter.DatabaseError (see _errors).
    exc = portable(exc)
    exc.__cause__ = RemoteTraceback(tb)
    raise exc


_new_tuple = tuple.__new__


def millis(seconds: float) -> int:
    return max(0, int(seconds * 1000) + 1)
