"""The frame format: atomic-size frames, reassembly, and resynchronisation."""

from __future__ import annotations

import os
import random

import pytest

from mpwriter._wire import frames as _wire
from mpwriter._wire import replies as _reply
from mpwriter._wire.frames import FIRST, LAST, Assembler, FrameReader, Kind


def frames_of(payload: bytes, sender: int = 7, request_id: int = 1, slot: int = 3) -> list[bytes]:
    return list(_wire.encode_frames(Kind.EXECUTE, sender, request_id, slot, payload))


def test_every_frame_fits_in_one_atomic_pipe_write() -> None:
    frames = frames_of(os.urandom(50_000))
    assert len(frames) > 10
    assert all(len(frame) <= _wire.PIPE_BUF for frame in frames)


def test_a_small_request_is_one_frame_marked_first_and_last() -> None:
    (frame,) = frames_of(b"hello")
    (decoded,) = FrameReader().feed(frame)
    assert decoded.flags == FIRST | LAST
    assert (decoded.kind, decoded.sender, decoded.request_id, decoded.slot) == (
        Kind.EXECUTE,
        7,
        1,
        3,
    )
    assert decoded.payload == b"hello"


def test_frames_survive_arbitrary_read_boundaries() -> None:
    payloads = [os.urandom(random.randrange(0, 9000)) for _ in range(20)]
    stream = b"".join(
        frame for n, payload in enumerate(payloads) for frame in frames_of(payload, request_id=n)
    )
    reader, assembler = FrameReader(), Assembler()
    requests = []
    position = 0
    rng = random.Random(1)
    while position < len(stream):
        step = rng.randrange(1, 700)
        for frame in reader.feed(stream[position : position + step]):
            request = assembler.add(frame)
            if request is not None:
                requests.append(request)
        position += step
    assert [r.payload for r in requests] == payloads
    assert reader.skipped == 0


def test_interleaved_multi_frame_requests_of_two_senders_are_reassembled() -> None:
    a = frames_of(b"a" * 10_000, sender=1)
    b = frames_of(b"b" * 10_000, sender=2)
    interleaved = [frame for pair in zip(a, b, strict=True) for frame in pair]
    reader, assembler = FrameReader(), Assembler()
    done = [assembler.add(frame) for frame in reader.feed(b"".join(interleaved))]
    whole = [request for request in done if request is not None]
    assert sorted(request.payload for request in whole) == [b"a" * 10_000, b"b" * 10_000]


@pytest.mark.parametrize("cut", [1, 5, 17, 27, 100, 1000])
def test_reader_starting_mid_frame_resynchronises_on_the_next_frame(cut: int) -> None:
    torn = frames_of(os.urandom(2000), request_id=1)[0][cut:]
    whole = frames_of(b"next request", request_id=2)[0]
    reader = FrameReader()
    frames = reader.feed(torn + whole)
    assert [frame.payload for frame in frames] == [b"next request"]
    assert reader.skipped == len(torn)


def test_a_corrupted_payload_is_skipped_not_delivered() -> None:
    frame = bytearray(frames_of(b"x" * 100)[0])
    frame[-1] ^= 0xFF
    good = frames_of(b"good", request_id=9)[0]
    frames = FrameReader().feed(bytes(frame) + good)
    assert [f.payload for f in frames] == [b"good"]


def test_tail_frames_without_their_head_are_dropped() -> None:
    frames = frames_of(b"z" * 10_000)
    reader, assembler = FrameReader(), Assembler()
    results = [assembler.add(f) for f in reader.feed(b"".join(frames[1:]))]
    assert results == [None] * (len(frames) - 1)
    assert assembler.dropped == 1  # one request, counted once


def test_pieces_of_a_dead_sender_are_dropped() -> None:
    frames = frames_of(b"q" * 10_000, sender=42)
    reader, assembler = FrameReader(), Assembler()
    for frame in reader.feed(b"".join(frames[:2])):
        assert assembler.add(frame) is None
    assert assembler.senders() == {42}
    assembler.drop_senders({42})
    assert assembler.senders() == set()
    assert assembler.dropped == 1


def test_sender_token_carries_the_pid() -> None:
    token = _wire.make_sender_token(12345)
    assert _wire.sender_pid(token) == 12345
    assert _wire.make_sender_token(12345) != token


def test_reply_round_trip() -> None:
    encoded = _wire.encode_reply(77, _wire.Status.OK, (1, 2, [(3,)]))
    length, request_id = _wire.decode_reply_header(encoded[: _wire.REPLY_HEADER_SIZE])
    assert request_id == 77
    assert length == len(encoded) - _wire.REPLY_HEADER_SIZE


@pytest.mark.parametrize(
    "value", [(1, 42, []), (0, None, []), (-1, 2**63 - 1, []), (100_000, -(2**63), [])]
)
def test_a_write_result_travels_without_pickle_and_unpacks_equal(
    value: tuple[int, int | None, list[object]],
) -> None:
    encoded = _wire.encode_wrote(9, value[0], value[1])
    assert encoded[_wire.REPLY_HEADER_SIZE] != _wire.PICKLED
    assert _reply.Incoming(9).take(encoded) == encoded  # its header gives its whole size
    unpacked = _reply.unpack_reply(encoded)
    # Decoded straight into the Result that execute() returns, columns None.
    assert type(unpacked) is _reply.Result
    assert unpacked == _reply.Result(*value)
    assert unpacked.columns is None


@pytest.mark.parametrize(
    "value",
    [
        (-1, None, [(1, "x", 2.5, b"blob", None, 2**70)], ("a", "b", "c", "d", "e", "f")),
        (0, 7, [], ("id",)),
        (3, 9, [(1,), (2,), (3,)], ("id",)),
    ],
)
def test_a_result_set_travels_marshalled_and_unpacks_into_an_equal_result(
    value: tuple[int, int | None, list[tuple[object, ...]], tuple[str, ...]],
) -> None:
    encoded = _wire.encode_rows(9, value)
    assert encoded[_wire.REPLY_HEADER_SIZE] == _wire.ROWS_TAG
    assert _reply.Incoming(9).take(encoded) == encoded  # its header gives its whole size
    unpacked = _reply.unpack_reply(encoded)
    assert type(unpacked) is _reply.Result
    assert unpacked == _reply.Result(*value)
    for row, sent in zip(unpacked.rows, value[2], strict=True):
        assert [type(item) for item in row] == [type(item) for item in sent]


class Named(str):
    """A str subclass: marshal refuses it, pickle keeps its class."""


def test_a_result_set_marshal_refuses_is_pickled_with_its_types() -> None:
    value = (-1, None, [(Named("kept"),)], ("name",))
    encoded = _wire.encode_rows(9, value)
    assert encoded[_wire.REPLY_HEADER_SIZE] == _wire.PICKLED
    unpacked = _reply.unpack_reply(encoded)
    assert unpacked == value
    assert type(unpacked[2][0][0]) is Named


def test_any_other_result_is_pickled_and_unpacks_equal() -> None:
    value = (1, 2, [(3, "row")])
    encoded = _wire.encode_reply(9, _wire.Status.OK, value)
    assert encoded[_wire.REPLY_HEADER_SIZE] == _wire.PICKLED
    assert _reply.unpack_reply(encoded) == value


def test_pieces_left_untouched_too_long_are_dropped() -> None:
    import time

    frames = frames_of(b"s" * 10_000, sender=43)
    reader, assembler = FrameReader(), Assembler()
    for frame in reader.feed(frames[0]):
        assert assembler.add(frame) is None
    assembler.drop_stale(time.monotonic() - 3600)
    assert assembler.senders() == {43}  # recent: kept
    assembler.drop_stale(time.monotonic() + 1)
    assert assembler.senders() == set()
    assert assembler.dropped == 1


def test_after_a_torn_frame_a_frame_inside_a_payload_is_not_taken_for_a_real_one() -> None:
    key = _wire.new_frame_key()
    # A caller's blob that holds an encoded frame, as stored bytes may.
    counterfeit = _wire.encode_frame(Kind.CLOSE, _wire.WHOLE, 99, 12345, 0, b"")
    blob = os.urandom(100) + counterfeit + os.urandom(100)
    real = _wire.encode_frame(Kind.EXECUTE, _wire.WHOLE, 7, 1, 3, blob, key)
    after = _wire.encode_frame(Kind.EXECUTE, _wire.WHOLE, 7, 2, 3, b"next", key)
    # The reader starts inside the real frame's header (its predecessor died
    # there): it must skip the whole payload, counterfeit included.
    frames = FrameReader(key).feed(real[5:] + after)
    assert [frame.request_id for frame in frames] == [2]


def test_a_keyed_stream_reads_whole_and_refuses_other_keys() -> None:
    key = _wire.new_frame_key()
    payload = os.urandom(9000)
    stream = b"".join(_wire.encode_frames(Kind.EXECUTE, 7, 1, 3, payload, key))
    assembler = Assembler()
    requests = [assembler.add(f) for f in FrameReader(key).feed(stream)]
    assert [r.payload for r in requests if r is not None] == [payload]
    other = FrameReader(key ^ 1)
    assert other.feed(stream) == []
    assert other.skipped > 0


def test_partial_requests_are_bounded_in_bytes_and_drops_counted() -> None:
    assembler = Assembler(max_bytes=10_000)
    payload = os.urandom(9_000)
    first = frames_of(payload, sender=1)  # three frames
    second = frames_of(payload, sender=2)
    reader = FrameReader()
    for frame in reader.feed(first[0] + first[1]):
        assert assembler.add(frame) is None
    # The second sender's pieces push the held bytes past the bound: the
    # oldest unfinished request goes, the growing one stays.
    for frame in reader.feed(second[0] + second[1]):
        assert assembler.add(frame) is None
    assert assembler.dropped == 1
    assert assembler.dropped_bytes == 2 * _wire.MAX_PAYLOAD
    (last,) = reader.feed(second[2])
    request = assembler.add(last)
    assert request is not None
    assert request.payload == payload
    (late,) = reader.feed(first[2])
    assert assembler.add(late) is None  # its head was dropped: never whole
    assert assembler.dropped == 1  # and it was counted when it was dropped, only then
