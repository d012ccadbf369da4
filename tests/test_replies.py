"""Reading a reply off its pipe: whole, torn, large, foreign, cut short."""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator

import pytest

import mpwriter
from mpwriter._wire import frames as _wire
from mpwriter._wire import replies as _reply


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A reply pipe; each test closes the write end itself (EOF is part of it)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    try:
        yield read_fd, write_fd
    finally:
        os.close(read_fd)


def read_all(incoming: _reply.Incoming, fd: int) -> bytes | bytearray:
    while True:
        assert select.select([fd], [], [], 10.0)[0], "no data"
        reply = incoming.read(fd)
        if reply is not None:
            return reply


def test_a_reply_in_one_read_is_returned_as_read(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    encoded = _wire.encode_reply(7, _wire.Status.OK, "payload")
    os.write(write_fd, encoded)
    os.close(write_fd)
    reply = _reply.Incoming(7).read(read_fd)
    assert reply == encoded
    assert reply is not None
    assert _reply.unpack_reply(reply) == "payload"


def test_a_torn_header_and_a_large_reply_are_reassembled(pipe: tuple[int, int]) -> None:
    """The header arrives a byte at a time, then 8 MB in pipe-sized pieces:
    the bytes come out whole and in order."""
    read_fd, write_fd = pipe
    payload = os.urandom(1 << 16) * 128  # 8 MiB
    encoded = _wire.encode_reply(9, _wire.Status.OK, payload)
    incoming = _reply.Incoming(9)
    for index in range(_wire.REPLY_HEADER_SIZE):
        os.write(write_fd, encoded[index : index + 1])
        assert incoming.read(read_fd) is None
    rest = encoded[_wire.REPLY_HEADER_SIZE :]

    def feed() -> None:
        view = memoryview(rest)
        while view:
            written = os.write(write_fd, view[: 1 << 16])
            view = view[written:]
        os.close(write_fd)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        reply = read_all(incoming, read_fd)
    finally:
        feeder.join(10.0)
    assert bytes(reply) == encoded
    assert _reply.unpack_reply(reply) == payload


def test_a_reply_to_another_request_is_an_error(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.write(write_fd, _wire.encode_reply(8, _wire.Status.OK, "not yours"))
    os.close(write_fd)
    with pytest.raises(mpwriter.Error, match="reply to request 8 arrived for request 7"):
        _reply.Incoming(7).read(read_fd)


def test_eof_before_and_inside_a_reply(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    encoded = _wire.encode_reply(5, _wire.Status.OK, "x" * 100)
    os.write(write_fd, encoded[:50])
    os.close(write_fd)
    incoming = _reply.Incoming(5)
    assert not incoming.started
    assert incoming.read(read_fd) is None
    assert incoming.started
    with pytest.raises(EOFError):
        incoming.read(read_fd)


def test_read_reply_returns_a_whole_reply_as_read(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    encoded = _wire.encode_wrote(3, 1, 42)
    os.write(write_fd, encoded)
    os.close(write_fd)
    reply = _reply.read_reply(read_fd, 3)
    assert reply == encoded
    assert isinstance(reply, bytes)
    assert _reply.unpack_reply(reply) == mpwriter.Result(1, 42, [], None)


def test_read_reply_hands_a_partial_reply_on_as_incoming(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    encoded = _wire.encode_reply(4, _wire.Status.OK, "y" * 100)
    os.write(write_fd, encoded[:5])  # not even the header
    first = _reply.read_reply(read_fd, 4)
    assert isinstance(first, _reply.Incoming)
    assert first.started
    os.write(write_fd, encoded[5:])
    os.close(write_fd)
    assert _reply.unpack_reply(read_all(first, read_fd)) == "y" * 100


def test_read_reply_refuses_another_requests_reply_and_reports_eof(
    pipe: tuple[int, int],
) -> None:
    read_fd, write_fd = pipe
    os.write(write_fd, _wire.encode_wrote(8, 1, 1))
    with pytest.raises(mpwriter.Error, match="reply to request 8 arrived for request 7"):
        _reply.read_reply(read_fd, 7)
    os.close(write_fd)
    with pytest.raises(EOFError):
        _reply.read_reply(read_fd, 7)
