"""The file of a streamed ``executemany``: its encoder (caller) and decoder (writer).

A large ``executemany`` is *streamed* (frame flag `STREAMED`, with
`HANDED_OVER`): the caller encodes its rows a chunk at a time into an
anonymous file while it reads them (`write_rows`, then `finish_rows`), so it
never holds them all, and the writer decodes them a chunk at a time while
the engine runs them (`StreamedRows`). The file is a sequence of records,
each a `STREAM_RECORD` length then that many bytes: every record but the
last is one list of rows, marshalled, or pickled where marshal cannot (such
a record starts with `PICKLED`, which no marshalled list does); the last is
the request's ordinary payload, ``(deadline, sent_at, (sql, None))`` --
written last because the deadline counts from when the rows have all been
read -- and the file ends with that record's length again
(`STREAM_RECORD`), so the writer finds it from the end.

Both sides import this module; it imports neither.
"""

from __future__ import annotations

import itertools
import marshal
import os
import pickle
from collections.abc import Iterator
from typing import Any

from .._errors import NotPicklable
from .frames import PICKLE_PROTOCOL, PICKLED, STREAM_RECORD

# The first chunk is read with this many rows, whatever their size; an
# iterable that ends within it goes as an ordinary request. Later chunks aim
# at `STREAM_CHUNK_BYTES` encoded, going by the size of the chunk before,
# and hold at most `STREAM_CHUNK_ROWS_MAX` rows: what the caller holds at
# once, and the writer too.
STREAM_FIRST_ROWS = 1_000
STREAM_CHUNK_BYTES = 1 << 20
STREAM_CHUNK_ROWS_MAX = 10_000


# -- the caller's side: encoding ------------------------------------------------


def write_rows(fd: int, chunks: list[list[Any]], rows: Iterator[Any]) -> int:
    """Write the rows of a streamed executemany into ``fd``; return the bytes written.

    ``chunks`` holds the chunk already read (taken out of it here, so that no
    caller's frame keeps it alive), then ``rows`` is read to its end, one
    chunk at a time: only one chunk and its encoding are held at once. Raises
    whatever reading ``rows`` raises, or `NotPicklable`; the file is then the
    caller's to discard.

    A chunk of plain values (None, bool, int, float, str, bytes; bytearray
    and memoryview become bytes, as SQLite stores them) is marshalled, which
    costs about half of pickling on each side; from the first chunk that
    marshal refuses (a datetime, a str subclass), chunks are pickled.
    """
    written = 0
    chunk = chunks.pop()
    rows_per_chunk = STREAM_FIRST_ROWS
    plain = True
    while chunk:
        data = b""
        if plain:
            try:
                data = marshal.dumps(chunk)
            except ValueError:
                plain = False
        if not plain:
            try:
                data = pickle.dumps(chunk, PICKLE_PROTOCOL)
            except Exception as exc:
                message = f"cannot send this executemany's rows to the writer: {exc}"
                raise NotPicklable(message) from exc
        # Next chunk: about STREAM_CHUNK_BYTES, judged by this one's rows.
        rows_per_chunk = max(
            1, min(STREAM_CHUNK_ROWS_MAX, STREAM_CHUNK_BYTES * len(chunk) // max(1, len(data)))
        )
        del chunk
        written += _write_record(fd, data, written)
        del data
        chunk = list(itertools.islice(rows, rows_per_chunk))
    return written


def finish_rows(fd: int, written: int, payload: bytes) -> int:
    """End a streamed file with the request's ``payload`` and its length; return its length."""
    written += _write_record(fd, payload, written)
    _write_all(fd, STREAM_RECORD.pack(len(payload)), written)
    return written + STREAM_RECORD.size


def _write_record(fd: int, data: bytes, offset: int) -> int:
    _write_all(fd, STREAM_RECORD.pack(len(data)), offset)
    _write_all(fd, data, offset + STREAM_RECORD.size)
    return STREAM_RECORD.size + len(data)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    # Memory, not a disk: this never waits on a device.
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


# -- the writer's side: decoding ------------------------------------------------


def read_whole(fd: int, length: int, start: int = 0) -> bytes:
    """``length`` bytes of a handed-over file from ``start``; fewer if it was cut short."""
    # pread: the sender's writes moved the file offset, which the two
    # descriptors share.
    chunks = []
    done = 0
    while done < length:
        chunk = os.pread(fd, length - done, start + done)
        if not chunk:
            break  # cut short: the caller sees the length does not match
        chunks.append(chunk)
        done += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class StreamedRows:
    """The rows of a streamed executemany, read from its file one chunk at a time.

    The file's layout is described above: chunk records, then the request's
    own payload (`head`), then that payload's length. Iterating yields the
    parameter tuples, decoding one chunk at a time (marshal, or pickle where
    the record starts with pickle's PROTO opcode, which no marshalled list
    does), so only that chunk is held. Each ``iter()`` starts again from the
    first row (the file is read with ``pread``, never consumed): an engine
    that replays a batch runs all the rows again. A record that is cut short
    or does not decode raises `ValueError` from the iteration, which fails the
    request: its savepoint rolls back every row.
    """

    __slots__ = ("_rows_end", "fd", "head")

    def __init__(self, fd: int, length: int) -> None:
        """Read the head; raises `ValueError` if the file does not hold that layout."""
        self.fd = fd
        size = STREAM_RECORD.size
        if length < 2 * size or os.fstat(fd).st_size < length:
            raise ValueError("a streamed file cut short")
        (head_length,) = STREAM_RECORD.unpack(_read_exactly(fd, size, length - size))
        head_start = length - size - head_length
        if head_start < size:
            raise ValueError("a streamed file whose last record overruns it")
        self.head = _read_exactly(fd, head_length, head_start)
        self._rows_end = head_start - size

    def __iter__(self) -> Iterator[Any]:
        return itertools.chain.from_iterable(self._chunks())

    def _chunks(self) -> Iterator[list[Any]]:
        fd, size, end = self.fd, STREAM_RECORD.size, self._rows_end
        offset = 0
        while offset < end:
            (length,) = STREAM_RECORD.unpack(_read_exactly(fd, size, offset))
            offset += size
            if offset + length > end:
                raise ValueError("a streamed executemany's rows overrun their file")
            data = _read_exactly(fd, length, offset)
            try:
                chunk = pickle.loads(data) if data[0] == PICKLED else marshal.loads(data)
            except Exception as exc:
                raise ValueError(
                    f"a chunk of a streamed executemany could not be decoded: {exc!r}"
                ) from exc
            del data
            offset += length
            yield chunk
            del chunk  # held by the chain meanwhile: let it go before the next read


def _read_exactly(fd: int, length: int, offset: int) -> bytes:
    data = read_whole(fd, length, offset)
    if len(data) != length:
        raise ValueError("a streamed executemany's file was cut short")
    return data
