"""The wire protocol: request frames on the shared queue, replies on reply pipes.

Requests
--------
Every caller writes to one shared pipe. A write of at most ``PIPE_BUF`` bytes
to a pipe is atomic on POSIX: it lands whole or not at all, even when the
writing process is SIGKILLed, and never interleaves with another process's
write. So every frame is at most ``PIPE_BUF`` bytes and is written with one
``os.write``, and no cross-process lock exists that a dying client could keep
held (the flaw that wedges a plain ``multiprocessing.Queue``).

A request larger than one frame is split into frames that share the sender's
token and the request id; the writer reassembles them (`Assembler`) and drops
the pieces of a sender that died half-way. A request of `HAND_OVER_MIN` bytes
or more (a bulk ``executemany``) is not cut up at all, where the system has
memfd: its payload is written to an anonymous file whose descriptor goes to
the writer over the side socket, and a single empty frame flagged
`HANDED_OVER` keeps its place in the queue. Measured for a 10.7 MB request:
2,631 frames cost ~47 ms to encode, pass and reassemble; the file, ~8 ms.
And a bulk load no longer fills the shared pipe ahead of everyone else.

A large ``executemany`` is *streamed* (frame flag `STREAMED`, with
`HANDED_OVER`): its rows come in that file a chunk at a time, in the layout
`mpwriter._wire.streamed` writes and reads.

Each frame carries a magic, its length and two CRC-32 check values (header and
payload), so a reader that starts in the middle of the stream -- a new writer
after its predecessor died part-way through a read -- can tell a whole frame
from a torn one and resynchronise on the next real frame (`FrameReader`).

Resynchronising scans payload bytes, and a payload may hold anything -- a
caller's blob may even hold an encoded frame. So the header check value is
keyed: it covers a per-stream key (`new_frame_key`) that the owner makes for
each writer and gives only to the writer and the handles, and that never
appears in a payload. A frame counterfeited by payload bytes would need the
key; by chance, one in 2**32 positions.

Side socket
-----------
File descriptors travel on a Unix datagram socket beside the queue, one per
message: a reply pipe's write end (`PIPE_REGISTRATION`) or a handed-over
payload (`PAYLOAD_HANDOVER`). A sender always sends the message before the
frame that needs it, so the writer finds it queued when the frame arrives.

Replies
-------
A reply goes to the reply pipe that the request named, which only that request
is using; it is a small header (payload length, request id) and a pickled
``(status, value)`` -- or, for the two usual OK replies, a tag byte that no
pickle starts with: a write without rows as two integers (`encode_wrote`), a
result set marshalled (`encode_rows`). No atomicity is needed there: one
writer, one reader.
"""

from __future__ import annotations

import enum
import marshal
import os
import pickle
import select
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL

# 4096 on Linux, 512 on macOS: the largest write that is atomic on a pipe.
PIPE_BUF: int = getattr(select, "PIPE_BUF", 512)


class Kind(enum.IntEnum):
    """What a request asks of the writer; carried in each frame's header."""

    EXECUTE = 1  # (sql, params)
    EXECUTEMANY = 2  # (sql, seq_of_params)
    SCRIPT = 3  # (script,)
    TRANSACTION = 4  # (list of (many: bool, sql, params),)
    CALL = 5  # (fn, args, kwargs)
    STATS = 6  # ()
    CLOSE = 7  # (): drain, commit, checkpoint, stop
    POST = 8  # (sql, params, dropped before this one): fire-and-forget, no reply
    SESSION = 9  # (transaction id, first, SessionOp, args, idle limit, total limit)


class SessionOp(enum.IntEnum):
    """What a `Kind.SESSION` request asks of its interactive transaction."""

    EXECUTE = 1  # args: (sql, params)
    EXECUTEMANY = 2  # args: (sql, list of params)
    SCRIPT = 3  # args: (script,)
    COMMIT = 4  # args: ()
    ROLLBACK = 5  # args: ()


class Status(enum.IntEnum):
    """Outcome carried in a reply."""

    OK = 0
    ERROR = 1  # value is (exception, writer-side traceback text)


FIRST = 0x01
LAST = 0x02
WHOLE = FIRST | LAST  # a request that fits in one frame
HANDED_OVER = 0x04  # the payload came on the side socket (PAYLOAD_HANDOVER)
STREAMED = 0x08  # with HANDED_OVER: that file holds rows in chunks (`streamed`)

# The length before each record of a streamed file, and after its last one
# (`streamed`).
STREAM_RECORD = struct.Struct("!Q")

HAND_OVER_MIN = 1 << 16
CAN_HAND_OVER = hasattr(os, "memfd_create")  # Linux

# Side-socket messages, each with one descriptor; the first byte tells which.
NO_REPLY = 0xFFFF  # slot number of a request that wants no reply (CLOSE, POST)

PIPE_TAG = 1
PAYLOAD_TAG = 2
# tag, sender token, slot, the request the sender awaits on it (0: a new pipe)
PIPE_REGISTRATION = struct.Struct("!BQHI")
# tag, sender token, request id, payload length
PAYLOAD_HANDOVER = struct.Struct("!BQIQ")
SIDE_MESSAGE_MAX = max(PIPE_REGISTRATION.size, PAYLOAD_HANDOVER.size)

_MAGIC = b"\xa7W"
# magic, kind, flags, payload length, sender token, request id, reply slot,
# payload CRC; then the header CRC over all of those.
_CHECKED = struct.Struct("!2sBBHQIHI")
_HEADER = struct.Struct("!2sBBHQIHII")
_HEADER_CHECKED = _CHECKED.size
_HEADER_CRC = struct.Struct("!I")
HEADER_SIZE = _HEADER.size
MAX_PAYLOAD = PIPE_BUF - HEADER_SIZE


class Frame(NamedTuple):
    kind: int
    flags: int
    sender: int
    request_id: int
    slot: int
    payload: bytes


class Request(NamedTuple):
    """A whole request, reassembled; the payload is still pickled."""

    kind: int
    sender: int
    request_id: int
    slot: int
    payload: bytes


def sender_pid(sender: int) -> int:
    """The process id a sender token was made for (its high 32 bits)."""
    return sender >> 32


def make_sender_token(pid: int) -> int:
    """A token unique to this process: its pid plus 32 random bits.

    The random half keeps a recycled pid from being taken for the dead
    process that had it before.
    """
    return (pid << 32) | int.from_bytes(os.urandom(4), "big")


def new_frame_key() -> int:
    """A fresh stream key: 32 random bits, never 0 (the unkeyed stream)."""
    return int.from_bytes(os.urandom(4), "big") or 1


def encode_frame(
    kind: int,
    flags: int,
    sender: int,
    request_id: int,
    slot: int,
    chunk: bytes | memoryview,
    key: int = 0,
) -> bytes:
    """One frame: header, header CRC, payload (at most `MAX_PAYLOAD` bytes).

    ``key`` is the stream's key (`new_frame_key`): the header CRC starts from
    it, so only a reader that knows it accepts the frame.
    """
    head = _CHECKED.pack(
        _MAGIC, kind, flags, len(chunk), sender, request_id, slot, zlib.crc32(chunk)
    )
    # Two concatenations of small bytes cost less than int.to_bytes and a join,
    # and this runs for every request.
    return head + _HEADER_CRC.pack(zlib.crc32(head, key)) + chunk


def encode_frames(
    kind: int, sender: int, request_id: int, slot: int, payload: bytes, key: int = 0
) -> Iterator[bytes]:
    """Split a pickled request into frames of at most ``PIPE_BUF`` bytes."""
    if len(payload) <= MAX_PAYLOAD:
        return iter((encode_frame(kind, WHOLE, sender, request_id, slot, payload, key),))
    return _split(kind, sender, request_id, slot, payload, key)


def _split(
    kind: int, sender: int, request_id: int, slot: int, payload: bytes, key: int
) -> Iterator[bytes]:
    view = memoryview(payload)
    total = len(view)
    for offset in range(0, total, MAX_PAYLOAD):
        flags = (FIRST if offset == 0 else 0) | (LAST if offset + MAX_PAYLOAD >= total else 0)
        chunk = view[offset : offset + MAX_PAYLOAD]
        yield encode_frame(kind, flags, sender, request_id, slot, chunk, key)


class FrameReader:
    """Cuts the byte stream read from the request pipe into checked frames.

    Bytes that do not form a valid frame (the tail of a frame whose head a dead
    predecessor consumed) are skipped one at a time until a frame's magic,
    header CRC (keyed with the stream's ``key``) and payload CRC all agree;
    `skipped` counts them.
    """

    def __init__(self, key: int = 0) -> None:
        self._rest = b""  # the start of a frame not yet read whole
        self._key = key
        self.skipped = 0

    def feed(self, data: bytes) -> list[Frame]:
        stream = self._rest + data if self._rest else data
        frames: list[Frame] = []
        position = 0
        end = len(stream)
        unpack_from, crc32, header_size, key, new = (
            _HEADER.unpack_from,
            zlib.crc32,
            HEADER_SIZE,
            self._key,
            _new_tuple,
        )
        while end - position >= header_size:
            magic, kind, flags, length, sender, request_id, slot, payload_crc, header_crc = (
                unpack_from(stream, position)
            )
            start = position + header_size
            if magic != _MAGIC or crc32(stream[position : start - 4], key) != header_crc:
                position = self._resync(stream, position + 1)
                continue
            if end - start < length:
                break  # the rest of this frame has not been read yet
            payload = stream[start : start + length]
            if crc32(payload) != payload_crc:
                position = self._resync(stream, position + 1)
                continue
            # tuple.__new__ in C: Frame(...) would run the NamedTuple's Python __new__.
            frames.append(new(Frame, (kind, flags, sender, request_id, slot, payload)))
            position = start + length
        self._rest = stream[position:]
        return frames

    def _resync(self, stream: bytes, position: int) -> int:
        found = stream.find(_MAGIC, position)
        # Keep a last byte that may be the first half of a magic still unread.
        new_position = found if found >= 0 else max(position, len(stream) - 1)
        self.skipped += new_position - position + 1
        return new_position


_new_tuple = tuple.__new__


class Assembler:
    """Joins multi-frame requests; single-frame requests pass straight through.

    Pieces are kept per (sender, request id). A sender that dies between its
    first and last frame leaves pieces behind, and so does one that gave up
    half-way (its queue stayed full): `drop_senders` and `drop_stale` discard
    them. What is held is bounded by ``max_bytes``: past it, the oldest
    unfinished requests are dropped (never the one being added to, so one
    request of any size still passes). `dropped` and `dropped_bytes` count
    requests dropped unfinished.
    """

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._partial: dict[tuple[int, int], _Partial] = {}
        # Requests dropped unfinished lately, so that their later frames are
        # not counted as another dropped request (bounded: oldest forgotten).
        self._dropped_keys: dict[tuple[int, int], None] = {}
        self._bytes = 0
        self._max_bytes = max_bytes
        self.dropped = 0
        self.dropped_bytes = 0

    def add(self, frame: Frame) -> Request | None:
        flags = frame.flags
        if flags & FIRST and flags & LAST:
            return Request(frame.kind, frame.sender, frame.request_id, frame.slot, frame.payload)
        key = (frame.sender, frame.request_id)
        if flags & FIRST:
            if key in self._partial:
                self._drop(key)
            self._partial[key] = _Partial(frame)
            self._grew(key, len(frame.payload))
            return None
        entry = self._partial.get(key)
        if entry is None:
            # The head of this request was lost (read by a writer that died),
            # or it was dropped: it can never be whole, so its pieces are dropped.
            if flags & LAST:
                if key in self._dropped_keys:
                    del self._dropped_keys[key]  # counted when it was dropped
                else:
                    self.dropped += 1
            return None
        entry.chunks.append(frame.payload)
        entry.touched = time.monotonic()
        if not flags & LAST:
            self._grew(key, len(frame.payload))
            return None
        del self._partial[key]
        self._bytes -= entry.size
        head = entry.head
        return Request(head.kind, head.sender, head.request_id, head.slot, b"".join(entry.chunks))

    def _grew(self, key: tuple[int, int], size: int) -> None:
        self._partial[key].size += size
        self._bytes += size
        if self._bytes > self._max_bytes:
            for oldest in [k for k in self._partial if k != key]:
                self._drop(oldest)
                if self._bytes <= self._max_bytes:
                    break

    def _drop(self, key: tuple[int, int]) -> None:
        entry = self._partial.pop(key)
        self._bytes -= entry.size
        self.dropped += 1
        self.dropped_bytes += entry.size
        self._dropped_keys[key] = None
        if len(self._dropped_keys) > _DROPPED_KEYS_KEPT:
            del self._dropped_keys[next(iter(self._dropped_keys))]

    def senders(self) -> set[int]:
        return {sender for sender, _ in self._partial}

    def drop_senders(self, senders: set[int]) -> None:
        for key in [key for key in self._partial if key[0] in senders]:
            self._drop(key)

    def drop_stale(self, untouched_since: float) -> None:
        for key in [key for key, p in self._partial.items() if p.touched < untouched_since]:
            self._drop(key)


_DROPPED_KEYS_KEPT = 4096


class _Partial:
    __slots__ = ("chunks", "head", "size", "touched")

    def __init__(self, head: Frame) -> None:
        self.head = head
        self.chunks = [head.payload]
        self.size = 0  # bytes held, counted by `Assembler._grew`
        self.touched = time.monotonic()


_REPLY_HEADER = struct.Struct("!II")
REPLY_HEADER_SIZE = _REPLY_HEADER.size

# The usual reply -- a write that returned no rows: (rowcount, lastrowid, []) --
# goes without pickle: a tag byte that starts no pickle (those start with the
# PROTO opcode), then two signed 64-bit integers: unpickling a reply and
# building its tuple is a large share of a client's CPU per request.
_WROTE_REPLY = struct.Struct("!IIcqq")
_WROTE = b"W"
_WROTE_NO_ROWID = b"w"  # lastrowid is None
_WROTE_SIZE = _WROTE_REPLY.size - REPLY_HEADER_SIZE
# A statement with a result set (a query, a RETURNING): its 4-tuple,
# marshalled, after a tag byte (`encode_rows`).
_ROWS_REPLY = struct.Struct("!IIc")
_ROWS = b"R"
PICKLED = pickle.PROTO[0]  # the first byte of every other reply's payload


def encode_reply(request_id: int, status: Status, value: Any) -> bytes:
    """Pickle a reply; raises whatever pickle raises for ``value``."""
    payload = pickle.dumps((int(status), value), PICKLE_PROTOCOL)
    return _REPLY_HEADER.pack(len(payload), request_id) + payload


def encode_rows(request_id: int, result: tuple[Any, ...]) -> bytes:
    """The OK reply of a statement with a result set, ``(rowcount, lastrowid,
    rows, columns)``: marshalled, which costs both sides about half what
    pickle does, behind a tag byte (`ROWS_REPLY`); pickled like any reply
    (`encode_reply`) when marshal refuses a value.

    Only for values marshal keeps exactly: it refuses subclasses (a
    `sqlite3.Row`), but turns a bytearray or memoryview into bytes, so rows
    that may hold those must go through `encode_reply`. Raises whatever
    pickle raises for the fallback.
    """
    try:
        payload = marshal.dumps(result)
    except ValueError:
        return encode_reply(request_id, Status.OK, result)
    return _ROWS_REPLY.pack(len(payload) + 1, request_id, _ROWS) + payload


def encode_wrote(request_id: int, rowcount: int, lastrowid: int | None) -> bytes:
    """The OK reply ``(rowcount, lastrowid, [])`` of a write, without pickle."""
    if lastrowid is None:
        return _WROTE_REPLY.pack(_WROTE_SIZE, request_id, _WROTE_NO_ROWID, rowcount, 0)
    return _WROTE_REPLY.pack(_WROTE_SIZE, request_id, _WROTE, rowcount, lastrowid)


def decode_reply_header(reply: bytes) -> tuple[int, int]:
    """(payload length, request id) from the header that starts ``reply``."""
    length, request_id = _REPLY_HEADER.unpack_from(reply)
    return length, request_id


# For the caller's hot path (`replies.read_reply`, `replies.unpack_reply`),
# which unpacks these itself: a Python call fewer each.
REPLY_HEADER = _REPLY_HEADER
# A reply made by `encode_wrote`, header included: (length, request id, tag,
# rowcount, lastrowid); lastrowid is None when the tag is WROTE_NO_ROWID.
WROTE_REPLY = _WROTE_REPLY
WROTE_NO_ROWID = _WROTE_NO_ROWID
# The first payload byte of a reply made by `encode_rows` from marshal's
# bytes; the marshalled 4-tuple follows it.
ROWS_TAG = _ROWS[0]
