import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backbone.errors import ErrorCode, ProtocolViolation
from backbone.frames import (
    FLAG_RAW,
    FLAG_WAIT_ACK,
    FrameDecoder,
    FrameType,
    decode_payload,
    encode_data_frame,
    encode_json_frame,
    encode_payload,
    encode_ping,
    parse_data_frame,
)

MID = bytes(range(16))


def test_message_frame_round_trip_with_headers():
    flags, body = encode_payload({"op": "reboot", "n": 3})
    frame = encode_data_frame(
        FrameType.MESSAGE, flags | FLAG_WAIT_ACK, MID, body, {"traceparent": "00-abc"}
    )
    (length,) = struct.unpack("!I", frame[:4])
    assert length == len(frame) - 4
    frames = FrameDecoder(1 << 20).feed(frame)
    assert len(frames) == 1
    ftype, fbody = frames[0]
    df = parse_data_frame(ftype, fbody)
    assert df.type == FrameType.MESSAGE
    assert df.flags & FLAG_WAIT_ACK
    assert df.msg_id == MID
    assert df.headers == {"traceparent": "00-abc"}
    assert decode_payload(df.flags, df.body) == {"op": "reboot", "n": 3}


def test_bytes_pass_through_without_inflation():
    raw = bytes(range(256)) * 4
    flags, body = encode_payload(raw)
    assert flags == FLAG_RAW and body == raw
    frame = encode_data_frame(FrameType.MESSAGE, flags, MID, body)
    assert len(frame) == len(raw) + 4 + 1 + 19
    df = parse_data_frame(*FrameDecoder(1 << 20).feed(frame)[0])
    assert decode_payload(df.flags, df.body) == raw


def test_decoder_handles_any_split():
    frames = b"".join(encode_ping(i) for i in range(50))
    for step in (1, 2, 3, 7, 13, 64):
        d = FrameDecoder(100)
        out = []
        for i in range(0, len(frames), step):
            out += d.feed(frames[i : i + step])
        assert [f[0] for f in out] == [FrameType.PING] * 50
        assert d.buffered == 0


def test_oversize_length_is_refused_before_buffering():
    d = FrameDecoder(1024)
    with pytest.raises(ProtocolViolation) as e:
        d.feed(struct.pack("!IB", 4 * 1024**3 - 1, FrameType.MESSAGE))
    assert e.value.code == ErrorCode.FRAME_TOO_LARGE


def test_unknown_type_and_zero_length_are_protocol_errors():
    with pytest.raises(ProtocolViolation) as e:
        FrameDecoder(1024).feed(struct.pack("!IB", 1, 0x7F))
    assert e.value.code == ErrorCode.PROTOCOL_ERROR
    with pytest.raises(ProtocolViolation):
        FrameDecoder(1024).feed(struct.pack("!I", 0) + b"x")


def test_truncated_and_bad_header_data_frames():
    with pytest.raises(ProtocolViolation, match="truncated"):
        parse_data_frame(FrameType.MESSAGE, b"\x00" * 5)
    body = struct.pack("!B16sH", 0, MID, 100) + b"{}"
    with pytest.raises(ProtocolViolation, match="past the end"):
        parse_data_frame(FrameType.MESSAGE, body)
    body = struct.pack("!B16sH", 0, MID, 3) + b"[1]"
    with pytest.raises(ProtocolViolation, match="object of strings"):
        parse_data_frame(FrameType.MESSAGE, body)
    with pytest.raises(ProtocolViolation, match="not valid JSON"):
        decode_payload(0, b"{nope")


def test_json_frames():
    f = encode_json_frame(FrameType.HELLO, {"version": 1})
    assert FrameDecoder(100).feed(f) == [(FrameType.HELLO, b'{"version":1}')]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.lists(st.integers(0, 2048), max_size=8))
def test_decoder_never_raises_anything_but_protocol_violation(data, cuts):
    d = FrameDecoder(512)
    points = sorted(set([0, len(data), *[c for c in cuts if c <= len(data)]]))
    try:
        for a, b in itertools.pairwise(points):
            for ftype, body in d.feed(data[a:b]):
                if ftype in (FrameType.MESSAGE, FrameType.RESULT):
                    df = parse_data_frame(ftype, body)
                    decode_payload(df.flags, df.body)
    except ProtocolViolation:
        return
    assert d.buffered <= 512 + 5 + len(data)
    assert d.buffered < 5 or struct.unpack("!I", bytes(d._buf[:4]))[0] <= 512
